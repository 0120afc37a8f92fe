//! The merge-quality benchmark: fine-tuned MLP bodies merged with every
//! method of the library, each task evaluated with its own head on the
//! merged body. Prints markdown tables (see `docs/quality.md`).
//!
//! Run: `cargo bench --bench quality` (about a few minutes on 2 cores), or
//! `cargo bench --bench quality -- --quick` (seconds); `-- --help` lists
//! the options.

#[path = "quality/mod.rs"]
mod quality;

fn main() {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        print!("{}", quality::USAGE);
        return;
    }
    let options = match quality::Options::parse(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let start = std::time::Instant::now();
    match quality::run(&options) {
        Ok(report) => {
            print!("{}", report.markdown());
            println!(
                "\nWall time: {:.1} s (threads: {}).",
                start.elapsed().as_secs_f64(),
                options
                    .threads
                    .map_or("all cores".to_string(), |t| t.to_string())
            );
        }
        Err(message) => {
            eprintln!("quality benchmark failed: {message}");
            std::process::exit(1);
        }
    }
}
