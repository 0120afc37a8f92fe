//! `flatmerge`: the command-line face of the flatmerge library. It parses
//! arguments, calls the library, and formats what comes back; the merge
//! logic lives in the library.

use clap::{Args, Parser, Subcommand};
use flatmerge::config::{parse_byte_size, MergeConfig};
use flatmerge::dtype::Dtype;
use flatmerge::engine::{MergeOptions, MergeSummary, PreparedMerge, Progress};
use flatmerge::inspect::{self, Coverage};
use flatmerge::io::Checkpoint;
use flatmerge::plan::Plan;
use flatmerge::{Error, ErrorKind};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

mod probe;

#[derive(Parser)]
#[command(
    name = "flatmerge",
    version,
    about = "Merge fine-tuned checkpoints on CPU: SAFE-M, FAM and mergekit-style baselines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Merge the models of a config (mergekit YAML layout) into OUT_DIR.
    Merge(MergeArgs),
    /// Show the tensors of a checkpoint, or the layers of a statistics file.
    Inspect(InspectArgs),
    /// FAM's neuron mapping between two models, without writing a model.
    Map(MapArgs),
    /// Run a model flatmerge can execute itself (MLP, LLaMA family) on a probe set and write its activation statistics.
    Probe(probe::ProbeArgs),
    /// Probe sets (JSON Lines): build the meta-probe mixture.
    #[command(subcommand)]
    ProbeSet(probe::ProbeSetCommand),
    /// Statistics files: combine recordings of disjoint examples.
    #[command(subcommand)]
    Stats(probe::StatsCommand),
    /// Build a small LLaMA-shaped family with statistics and merge it with SAFE-M (no downloads).
    Demo(DemoArgs),
}

#[derive(Args)]
struct MergeArgs {
    /// The merge config (YAML).
    config: PathBuf,
    /// The output directory.
    out_dir: Option<PathBuf>,
    /// The output directory (alternative to the positional argument).
    #[arg(
        short = 'o',
        long = "output",
        value_name = "OUT_DIR",
        conflicts_with = "out_dir"
    )]
    output: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
    /// Output dtype (bfloat16, float16, float32); overrides the config.
    #[arg(long, value_parser = parse_dtype)]
    dtype: Option<Dtype>,
    /// NaN or infinite input weights: `error` (default) or `propagate`; overrides the config.
    #[arg(long, value_parser = ["error", "propagate"])]
    nan_policy: Option<String>,
    /// Tensors only some models hold are errors (FAM: tensors of A without a
    /// counterpart and dropped tensors of B; mergekit-style methods: tensors
    /// some models lack, and tensors the base lacks).
    #[arg(long)]
    strict: bool,
    /// Seed of DARE's and DELLA's random masks (default 0); masks depend only on the seed, the model and the tensor.
    #[arg(long, value_name = "N")]
    random_seed: Option<u64>,
    /// Check the inputs and print the plan (rule, shapes, bytes per tensor) without merging.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    mergekit: MergekitFlags,
}

/// `mergekit-yaml`'s flags, so that its command lines run unchanged.
#[derive(Args)]
struct MergekitFlags {
    /// Leave the tokenizer files out of the output (mergekit's flag; the default copies them).
    #[arg(long, overrides_with = "copy_tokenizer")]
    no_copy_tokenizer: bool,
    /// Copy the tokenizer files of the model the output's names come from (the default).
    #[arg(long, overrides_with = "no_copy_tokenizer")]
    copy_tokenizer: bool,
    /// Write a README.md model card (method, inputs, config) into the output.
    #[arg(long)]
    write_model_card: bool,
    /// mergekit: allow mixing architectures. flatmerge checks shapes, not architectures: a no-op.
    #[arg(long)]
    allow_crimes: bool,
    /// mergekit: unpickle lazily. flatmerge reads memory-mapped safetensors only: a no-op.
    #[arg(long)]
    lazy_unpickle: bool,
    /// mergekit: lower memory use. flatmerge always holds a few tensors at a time: a no-op.
    #[arg(long)]
    low_cpu_memory: bool,
    /// mergekit: compute on the CPU. flatmerge always does: a no-op.
    #[arg(long)]
    no_cuda: bool,
    // mergekit-yaml flags flatmerge refuses with a reason (see `check`).
    #[arg(long, hide = true)]
    cuda: bool,
    #[arg(long, hide = true)]
    read_to_gpu: bool,
    #[arg(long, hide = true)]
    multi_stream: bool,
    #[arg(long, hide = true)]
    gpu_rich: bool,
    #[arg(long, hide = true)]
    trust_remote_code: bool,
    #[arg(long, hide = true, value_name = "DIR")]
    lora_merge_cache: Option<String>,
    #[arg(long, hide = true, value_name = "DEVICE")]
    device: Option<String>,
}

impl MergekitFlags {
    /// An error for a refused flag; a note for each accepted no-op.
    fn check(&self, config: &std::path::Path) -> Result<Vec<&'static str>, Error> {
        let cpu = "flatmerge merges on the CPU";
        let refused = [
            (self.cuda, "--cuda", cpu),
            (self.read_to_gpu, "--read-to-gpu", cpu),
            (self.multi_stream, "--multi-stream", cpu),
            (self.gpu_rich, "--gpu-rich", cpu),
            (self.device.is_some(), "--device", cpu),
            (
                self.trust_remote_code,
                "--trust-remote-code",
                "flatmerge runs no model code; it reads safetensors and config.json only",
            ),
            (
                self.lora_merge_cache.is_some(),
                "--lora-merge-cache",
                "flatmerge takes local checkpoints only and caches nothing",
            ),
        ];
        if let Some((_, flag, why)) = refused.iter().find(|(set, _, _)| *set) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{flag} is a mergekit-yaml flag flatmerge does not take: {why}"),
            )
            .with_file(config));
        }
        Ok([
            (
                self.allow_crimes,
                "--allow-crimes: flatmerge checks shapes, not architectures; nothing to allow",
            ),
            (
                self.lazy_unpickle,
                "--lazy-unpickle: flatmerge reads memory-mapped safetensors only; ignored",
            ),
            (
                self.low_cpu_memory,
                "--low-cpu-memory: flatmerge holds a few tensors at a time anyway; ignored",
            ),
            (
                self.no_cuda,
                "--no-cuda: flatmerge always merges on the CPU; ignored",
            ),
        ]
        .into_iter()
        .filter(|(set, _)| *set)
        .map(|(_, note)| note)
        .collect())
    }
}

#[derive(Args)]
struct RunArgs {
    /// Largest output shard (tensor bytes), e.g. 500M or 5B; default: one file.
    #[arg(long, value_parser = parse_byte_size, value_name = "SIZE")]
    out_shard_size: Option<u64>,
    /// Worker threads (default: all cores); results are identical for any count
    /// (`-j` / `--num-threads` as mergekit-yaml spells it).
    #[arg(long, short = 'j', visible_alias = "num-threads")]
    threads: Option<usize>,
    /// Replace an existing output directory (only once the merge has succeeded).
    #[arg(long)]
    force: bool,
    /// No progress bar and no summary.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Args)]
struct MapArgs {
    /// The receiver A.
    a: PathBuf,
    /// The contributor B.
    b: PathBuf,
    /// A's activation statistics (with per-example rows).
    #[arg(long)]
    stats_a: PathBuf,
    /// B's activation statistics (with per-example rows).
    #[arg(long)]
    stats_b: PathBuf,
    /// A built-in name map (`llava-hf-to-mplug-owl2`, …), `auto` (the
    /// built-in map that accounts for every tensor), or a rules file.
    #[arg(long)]
    name_map: Option<String>,
    /// Fail when any tensor of A or B is unaccounted for by the map.
    #[arg(long)]
    strict: bool,
    /// List every tensor by class (mapped, one-to-many, kept, dropped).
    #[arg(short, long)]
    all: bool,
    /// Group template: auto, llama_mlp, sequential, none.
    #[arg(long)]
    groups: Option<String>,
    /// Parameter preset: default or sketch.
    #[arg(long)]
    preset: Option<String>,
}

#[derive(Args)]
struct InspectArgs {
    /// A checkpoint (file or directory) or a statistics file.
    path: PathBuf,
    /// With a statistics file: list which weights of this checkpoint it covers.
    #[arg(long, value_name = "CHECKPOINT")]
    weights: Option<PathBuf>,
    /// List every tensor or layer, not only the totals.
    #[arg(short, long)]
    all: bool,
}

#[derive(Args)]
struct DemoArgs {
    /// Where to build the demo (default: a new folder under the system's temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The FAM demo instead: a LLaVA-1.5-like model merged into an mPLUG-Owl2-like one
    /// (different names, modality-adaptive copies, neurons permuted).
    #[arg(long)]
    fam: bool,
    #[command(flatten)]
    run: RunArgs,
}

fn parse_dtype(text: &str) -> Result<Dtype, String> {
    Dtype::parse_float(text).ok_or_else(|| {
        format!("`{text}` is not an output dtype; expected bfloat16, float16 or float32")
    })
}

fn main() -> ExitCode {
    // Die quietly when a reader such as `head` closes the pipe, as Unix tools
    // do, instead of panicking on the next print.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Merge(args) => merge(args),
        Command::Inspect(args) => inspect(args),
        Command::Map(args) => map(args),
        Command::Probe(args) => probe::probe(args),
        Command::ProbeSet(command) => probe::probe_set(command),
        Command::Stats(command) => probe::stats(command),
        Command::Demo(args) => demo(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(match e.kind() {
                ErrorKind::Cancelled => 130,
                _ => 1,
            })
        }
    }
}

/// A progress bar on stderr, or nothing when quiet or stderr is not a terminal.
fn progress_bar(quiet: bool) -> Option<ProgressBar> {
    if quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {binary_bytes}/{binary_total_bytes} {msg} [{elapsed}, eta {eta}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    Some(bar)
}

/// Set by SIGINT / SIGTERM; the engine checks it between tensors.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn run_merge(
    prepared: &PreparedMerge,
    out_dir: PathBuf,
    run: &RunArgs,
    mergekit: Option<&MergekitFlags>,
) -> Result<MergeSummary, Error> {
    let bar = progress_bar(run.quiet);
    let on_progress = |p: &Progress<'_>| {
        if let Some(bar) = &bar {
            bar.set_length(p.bytes_total);
            bar.set_position(p.bytes_done);
            bar.set_message(format!("{}/{} tensors", p.tensors_done, p.tensors_total));
        }
    };
    let options = MergeOptions {
        out_dir,
        max_shard_bytes: run.out_shard_size,
        threads: run.threads,
        force: run.force,
        progress: Some(&on_progress),
        cancel: Some(&INTERRUPTED),
        skip_tokenizer: mergekit.is_some_and(|m| m.no_copy_tokenizer),
        model_card: mergekit.is_some_and(|m| m.write_model_card),
    };
    // Ctrl-C or SIGTERM stops the merge between tensors; the writer then
    // removes its temporary directory, so nothing half-written remains.
    // (A handler can only be set once per process; one merge runs per process.)
    let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::Relaxed));
    let result = prepared.run(&options);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    result
}

fn merge(args: MergeArgs) -> Result<(), Error> {
    let notes = args.mergekit.check(&args.config)?;
    if !args.run.quiet {
        for note in notes {
            eprintln!("note: {note}");
        }
    }
    let mut config = MergeConfig::from_file(&args.config)?;
    if let Some(dtype) = args.dtype {
        config.out_dtype = Some(dtype);
    }
    if let Some(seed) = args.random_seed {
        config.seed = seed;
    }
    config.strict = args.strict;
    if let Some(policy) = args
        .nan_policy
        .as_deref()
        .and_then(flatmerge::config::NanPolicy::parse)
    {
        config.nan_policy = policy;
    }
    let prepared = PreparedMerge::new(config)?;
    if args.dry_run {
        println!("{}", prepared.plan());
        return Ok(());
    }
    let out_dir = args.output.or(args.out_dir).ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidInput,
            "no output directory: give OUT_DIR or -o OUT_DIR",
        )
        .with_file(&args.config)
    })?;
    let started = std::time::Instant::now();
    let summary = run_merge(&prepared, out_dir, &args.run, Some(&args.mergekit))?;
    if !args.run.quiet {
        print_summary(prepared.plan(), &summary);
        let seconds = started.elapsed().as_secs_f64();
        let input = prepared.input_bytes() as f64;
        let peak = flatmerge::engine::peak_resident_bytes()
            .map(|b| format!(", peak memory {} MB", b / 1_000_000))
            .unwrap_or_default();
        println!(
            "read {:.2} GB and wrote {:.2} GB in {seconds:.2} s ({:.2} GB/s of input){peak}",
            input / 1e9,
            prepared.plan().out_bytes() as f64 / 1e9,
            input / seconds / 1e9
        );
    }
    Ok(())
}

fn print_summary(plan: &Plan, summary: &MergeSummary) {
    let counts: Vec<String> = plan
        .rule_counts()
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(label, n)| format!("{label} {n}"))
        .collect();
    println!(
        "merged {} tensors ({}) into {}",
        plan.tensors.len(),
        counts.join(", "),
        summary.out_dir.display()
    );
    let (elements, totals) = summary.report.mask_totals();
    for (k, t) in totals.iter().enumerate() {
        if elements == 0 {
            break;
        }
        let pct = |x: u64| 100.0 * x as f64 / elements as f64;
        println!(
            "contributor {k}: elected {:.1}% of the SAFE-M parameters, {:.2}% dropped as sign conflicts, {:.1}% given (receiver elected {:.1}%)",
            pct(t.elected),
            pct(t.conflicts),
            pct(t.kept),
            pct(t.receiver_elected)
        );
    }
    println!(
        "report: {}",
        summary.out_dir.join("merge_report.json").display()
    );
}

fn map(args: MapArgs) -> Result<(), Error> {
    let config = MergeConfig::fam_pair(
        (&args.a, &args.stats_a),
        (&args.b, &args.stats_b),
        args.name_map.as_deref(),
        args.groups.as_deref(),
        args.preset.as_deref(),
    )?;
    let mut config = config;
    config.strict = args.strict;
    let prepared = PreparedMerge::new(config)?;
    let plan = prepared.plan();
    let settings = prepared
        .config()
        .fam()
        .ok_or_else(|| Error::new(ErrorKind::Plan, "map needs FAM settings"))?;
    let (name_map, acc) = flatmerge::methods::fam::resolve_name_map(settings, prepared.inputs())?;
    let picked = if settings.name_map.is_auto() {
        " (picked by auto)"
    } else {
        ""
    };
    println!("name map: {}{picked}", name_map.source);
    println!(
        "B → A: {} mapped one-to-one, {} one-to-many (into {} tensors of A), {} concatenated \
         into {} stacked tensors (into {} tensors of A), {} dropped from B; {} kept from A; \
         unaccounted: {} of A, {} of B",
        acc.mapped.len(),
        acc.one_to_many.len(),
        acc.one_to_many.iter().map(|(_, a)| a.len()).sum::<usize>(),
        acc.stacked_parts().len(),
        acc.concatenated.len(),
        acc.concatenated
            .iter()
            .map(|c| c.targets.len())
            .sum::<usize>(),
        acc.dropped_from_b.len(),
        acc.kept_from_a.len(),
        acc.unaccounted_a.len(),
        acc.unaccounted_b.len()
    );
    if args.all {
        for (b, a) in &acc.mapped {
            println!("  mapped       {b} → {a}");
        }
        for (b, a) in &acc.one_to_many {
            println!("  one-to-many  {b} → {}", a.join(", "));
        }
        for c in &acc.concatenated {
            println!(
                "  concatenated {} = {} → {}",
                c.name,
                c.parts.join(" + "),
                c.targets.join(", ")
            );
        }
        for a in &acc.kept_from_a {
            println!("  kept from A  {a}");
        }
        for b in &acc.dropped_from_b {
            println!("  dropped      {b}");
        }
    }
    for a in &acc.unaccounted_a {
        println!("  unaccounted  A {a}");
    }
    for b in &acc.unaccounted_b {
        println!("  unaccounted  B {b}");
    }
    for v in flatmerge::methods::fam::vocabulary_mismatches(plan, prepared.inputs()) {
        println!(
            "vocabulary {}: A {} rows, B {} rows: {} merged, {} kept from A, {} of B dropped",
            v["tensor"].as_str().unwrap_or("?"),
            v["rows_a"],
            v["rows_b"],
            v["merged_rows"],
            v["kept_from_a"],
            v["dropped_from_b"]
        );
    }
    let without = plan.tensors.iter().filter(|t| t.source.is_none()).count();
    println!(
        "{} tensors of A: {} with a counterpart in B, {} without; {} tensors of B dropped",
        plan.tensors.len(),
        plan.tensors.len() - without,
        without,
        plan.dropped.len()
    );
    for a in prepared.align()? {
        let s = a.summary();
        println!(
            "{:<40} A {:>6} B {:>6}  candidates {:>6}/{:<6} matched {:>6} dropped {:>5} fused {:>6}  mean corr {:.3}  mean FOS {:.3}",
            a.name, a.neurons_a, a.neurons_b, a.candidates.0, a.candidates.1, a.matched(),
            s["dropped_from_b"], s["fused"], s["mean_correlation"].as_f64().unwrap_or(0.0), s["mean_fos"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}

fn demo(args: DemoArgs) -> Result<(), Error> {
    let dir = match args.dir {
        Some(dir) => dir,
        None => std::env::temp_dir().join(format!("flatmerge-demo-{}", std::process::id())),
    };
    let out_dir = dir.join("merged");
    if args.fam {
        return demo_fam(&dir, out_dir, &args.run);
    }
    if !args.run.quiet {
        println!("building a LLaMA-shaped family (ancestor C, receiver A, contributor B) with statistics in {}", dir.display());
    }
    let (family, prepared) = flatmerge::demo::prepare(&dir)?;
    let summary = run_merge(&prepared, out_dir, &args.run, None)?;
    if !args.run.quiet {
        println!("config: {}", family.config.display());
        print_summary(prepared.plan(), &summary);
        println!(
            "inspect it with: flatmerge inspect {}",
            summary.out_dir.display()
        );
    }
    Ok(())
}

fn demo_fam(dir: &Path, out_dir: PathBuf, run: &RunArgs) -> Result<(), Error> {
    if !run.quiet {
        println!("building an mPLUG-Owl2-like receiver and a LLaVA-1.5-like contributor with statistics in {}", dir.display());
    }
    let (pair, prepared) = flatmerge::demo::prepare_fam(dir)?;
    let summary = run_merge(&prepared, out_dir, run, None)?;
    if !run.quiet {
        println!("config: {}", pair.config.display());
        print_summary(prepared.plan(), &summary);
        if let Some(fam) = summary.report.results.get("fam") {
            for (group, perm) in fam["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .zip(&pair.permutations)
            {
                let recovered = fam["mapping"]
                    .as_array()
                    .and_then(|m| m.iter().find(|g| g["group"] == group["group"]))
                    .and_then(|g| g["b_neuron_of_a"].as_array())
                    .map_or(0, |m| {
                        m.iter()
                            .enumerate()
                            .filter(|(i, j)| j.as_u64() == Some(perm[*i] as u64))
                            .count()
                    });
                println!(
                    "{}: {} of {} neurons matched, planted permutation recovered for {recovered}, mean correlation {:.3}",
                    group["group"].as_str().unwrap_or("?"),
                    group["matched"],
                    group["neurons_a"],
                    group["mean_correlation"].as_f64().unwrap_or(0.0)
                );
            }
        }
    }
    Ok(())
}

fn inspect(args: InspectArgs) -> Result<(), Error> {
    if inspect::is_stats_file(&args.path) {
        return inspect_stats(&args.path, args.weights.as_deref(), args.all);
    }
    if args.weights.is_some() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "--weights goes with a statistics file",
        )
        .with_file(&args.path));
    }
    let checkpoint = Checkpoint::open(&args.path)?;
    let summary = inspect::summarize(&checkpoint);
    if args.all {
        for t in checkpoint.tensors() {
            println!("{:<64} {:>5} {:?}", t.name, t.dtype.as_str(), t.shape);
        }
    }
    println!(
        "{}: {} tensors, {} parameters, {} bytes in {} file(s)",
        args.path.display(),
        summary.tensors,
        summary.parameters,
        summary.bytes,
        summary.shards
    );
    for (dtype, (tensors, elements)) in &summary.by_dtype {
        println!("  {dtype}: {tensors} tensors, {elements} parameters");
    }
    Ok(())
}

fn inspect_stats(path: &Path, weights: Option<&Path>, all: bool) -> Result<(), Error> {
    let stats = flatmerge::stats::ActivationStats::load(path)?;
    println!(
        "{}: activation statistics of `{}` on `{}`: {} examples, {} layers{}",
        path.display(),
        stats.model,
        stats.probe,
        stats.examples,
        stats.layers.len(),
        if stats.modality.is_some() {
            ", per-example rows with modalities"
        } else {
            ""
        }
    );
    let grams = inspect::grams(&stats);
    let examples = match &grams.sources {
        Some(sources) => format!("the probe examples of sources {}", sources.join(", ")),
        None => "every probe example".to_string(),
    };
    if grams.stored + grams.shared > 0 {
        println!(
            "  second moments (x_gram) for {} layers ({} stored, {} shared), none for {}; recorded on {examples}",
            grams.stored + grams.shared,
            grams.stored,
            grams.shared,
            grams.without
        );
    } else {
        println!("  no second moments (means only); recorded on {examples}");
    }
    if all {
        for (name, layer) in &stats.layers {
            let width =
                |v: &Option<Vec<f32>>| v.as_ref().map_or("-".to_string(), |v| v.len().to_string());
            println!(
                "  {name:<60} in {:>6} out {:>6} count {:>8} rows {} gram {}",
                width(&layer.x_mean),
                width(&layer.y_mean),
                layer.count.map_or("-".to_string(), |c| c.to_string()),
                layer.x_rows.as_ref().map_or(0, |r| r.rows),
                inspect::gram_of_layer(&stats, name)
            );
        }
    }
    if let Some(weights) = weights {
        let checkpoint = Checkpoint::open(weights)?;
        let coverage = inspect::coverage(&stats, &checkpoint);
        let covered = coverage
            .iter()
            .filter(|(_, c)| *c == Coverage::Covered)
            .count();
        println!(
            "{}: {covered} of {} linear weights and biases covered",
            weights.display(),
            coverage.len()
        );
        for (name, c) in &coverage {
            match c {
                Coverage::Covered if all => println!("  covered    {name}"),
                Coverage::Uncovered if all => println!("  fallback   {name} (no statistics)"),
                Coverage::Mismatch(why) => println!("  MISMATCH   {name}: {why}"),
                _ => {}
            }
        }
    }
    Ok(())
}
