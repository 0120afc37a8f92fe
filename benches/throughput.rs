//! End-to-end merge throughput against the read floor of the same files.
//!
//! Generates a LLaMA-shaped BF16 family — ancestor `C`, receiver `A`,
//! contributor `B`, with activation statistics — of about `--size` bytes
//! per checkpoint (kept under `--dir` and reused by later runs), warms the
//! page cache, measures the read floor as a parallel scan of the
//! memory-mapped inputs, then merges with every method in a child process
//! (`flatmerge merge` as a user runs it: open, plan, merge, write, rename)
//! and prints wall time, input GB/s, the ratio floor ÷ merge time and the
//! child's peak RSS. The write floor — writing and fsyncing as many bytes
//! as the merged model holds, in the output folder — is measured too: the
//! merge reads, computes and writes, so read + write is its real floor.
//!
//! Three families per size (`--families`, default all):
//! - `lowrank`: fine-tunes with low-rank task updates plus a normal drift;
//! - `bf16`: fine-tunes as bf16 training leaves them
//!   (`demo::bf16_fine_tune`): task vectors are differences of bf16
//!   weights — a dense update mostly below the bf16 spacing, larger updates
//!   on 2% of the entries, long runs of exactly equal magnitudes and whole
//!   percents of each tensor tied at a TIES threshold, as real ones have;
//! - `bf16-sharded`: the same in 500 MB shards, merged into 500 MB shards.
//!
//! Run: `cargo bench --bench throughput -- --size 1.1GB` (defaults:
//! `--sizes 100MB,400MB`, every method, all cores, best of 3).
//! Options: `--size S` / `--sizes S1,S2,…`, `--families f1,f2`,
//! `--methods m1,m2`, `--threads N`, `--reps N`, `--dir D` (default
//! `target/throughput`), `--out D` (where merges are written; default
//! beside the inputs — `/dev/shm/…` takes the disk out of the measurement).
//!
//! `tsv`, `iso_c`, `iso_cts` and `wudi` (SPEC §8) merge `A` and `B` over
//! `C` at their defaults: every 2-D weight's SVDs (or WUDI's solve) run
//! single-threaded per task, tasks in parallel.
//!
//! `regmean` merges `A` and `B` with Grams recorded by the native LLaMA
//! probe (`--gram`) on 8 random sequences of 64 tokens, once per family
//! (the recording time is printed, not counted); it reads two checkpoints
//! and their Grams where the floors count three checkpoints.

use flatmerge::config::{parse_byte_size, MergeConfig};
use flatmerge::demo::{write_family_with, FamilyOptions, LlamaShape};
use flatmerge::dtype::Dtype;
use flatmerge::engine::{peak_resident_bytes, thread_pool, MergeOptions, PreparedMerge};
use flatmerge::io::Checkpoint;
use flatmerge::probe::set::write_probe_set;
use flatmerge::probe::{probe_files, ProbeExample, ProbeInput, ProbeOptions};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const METHODS: [&str; 14] = [
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "safe_m",
    "regmean",
    "tsv",
    "iso_c",
    "iso_cts",
    "wudi",
];

/// A family of checkpoints: its name, how it is generated and stored.
#[derive(Clone, Copy)]
struct Family {
    name: &'static str,
    options: FamilyOptions,
}

const SHARD_BYTES: u64 = 500_000_000;

const FAMILIES: [Family; 3] = [
    Family {
        name: "lowrank",
        options: FamilyOptions {
            bf16_updates: false,
            shard_bytes: None,
        },
    },
    Family {
        name: "bf16",
        options: FamilyOptions {
            bf16_updates: true,
            shard_bytes: None,
        },
    },
    Family {
        name: "bf16-sharded",
        options: FamilyOptions {
            bf16_updates: true,
            shard_bytes: Some(SHARD_BYTES),
        },
    },
];

struct Options {
    sizes: Vec<u64>,
    families: Vec<Family>,
    methods: Vec<String>,
    threads: Option<usize>,
    reps: usize,
    dir: PathBuf,
    out: Option<PathBuf>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        child(&args[1..]);
        return;
    }
    let options = parse(&args);
    println!(
        "# flatmerge {} merge throughput; {} worker thread(s); best of {}",
        flatmerge::VERSION,
        options
            .threads
            .map_or_else(|| "all".to_string(), |t| t.to_string()),
        options.reps
    );
    for &size in &options.sizes {
        for &family in &options.families {
            run_size(&options, size, family);
        }
    }
}

fn parse(args: &[String]) -> Options {
    let mut options = Options {
        sizes: vec![100_000_000, 400_000_000],
        families: FAMILIES.to_vec(),
        methods: METHODS.iter().map(|m| m.to_string()).collect(),
        threads: None,
        reps: 3,
        dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/throughput"),
        out: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| panic!("{arg} needs a value"))
                .clone()
        };
        match arg.as_str() {
            "--size" | "--sizes" => {
                options.sizes = value()
                    .split(',')
                    .map(|s| parse_byte_size(s).unwrap_or_else(|e| panic!("{s}: {e}")))
                    .collect()
            }
            "--families" => {
                options.families = value()
                    .split(',')
                    .map(|f| {
                        *FAMILIES
                            .iter()
                            .find(|family| family.name == f)
                            .unwrap_or_else(|| panic!("unknown family {f}"))
                    })
                    .collect()
            }
            "--methods" => options.methods = value().split(',').map(str::to_string).collect(),
            "--threads" => options.threads = Some(value().parse().expect("--threads N")),
            "--reps" => options.reps = value().parse::<usize>().expect("--reps N").max(1),
            "--dir" => options.dir = PathBuf::from(value()),
            "--out" => options.out = Some(PathBuf::from(value())),
            // cargo bench passes `--bench`; criterion-style filters are not used.
            "--bench" => {}
            other => panic!("unknown option {other}; see the header of benches/throughput.rs"),
        }
    }
    options
}

fn run_size(options: &Options, size: u64, family: Family) {
    let shape = LlamaShape::with_bytes(size, Dtype::BF16);
    // The low-rank family keeps the folder name it always had.
    let suffix = match family.name {
        "lowrank" => String::new(),
        name => format!("-{name}"),
    };
    let dir = options
        .dir
        .join(format!("h{}-l{}{suffix}", shape.hidden, shape.layers));
    let started = Instant::now();
    let generated = ensure_family(&dir, &shape, family.options);
    let input_bytes: u64 = ["C", "A", "B"]
        .iter()
        .flat_map(|m| std::fs::read_dir(dir.join(m)).expect("generated"))
        .map(|entry| entry.expect("listing").path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .map(|p| std::fs::metadata(p).expect("generated").len())
        .sum();
    println!(
        "\n## `{}` family{}: {} parameters per checkpoint (hidden {}, MLP {}, {} layers), 3 × {:.2} GB BF16 = {:.2} GB of input{}",
        family.name,
        family
            .options
            .shard_bytes
            .map_or_else(String::new, |b| format!(" in {} MB shards", b / 1_000_000)),
        shape.parameters(),
        shape.hidden,
        shape.intermediate,
        shape.layers,
        input_bytes as f64 / 3e9,
        input_bytes as f64 / 1e9,
        if generated {
            format!(" (generated in {:.1} s)", started.elapsed().as_secs_f64())
        } else {
            String::new()
        }
    );
    if options.methods.iter().any(|m| m == "regmean") {
        ensure_grams(&dir, shape.vocab);
    }
    let pool = thread_pool(options.threads).expect("thread pool");
    // Each scan maps the files afresh, as a merge does: the floor includes
    // the page faults that map page-cache pages into the process. The first
    // scan warms the page cache.
    let open_and_scan = || {
        let maps: Vec<Checkpoint> = ["C", "A", "B"]
            .iter()
            .map(|m| Checkpoint::open(&dir.join(m)).expect("open"))
            .collect();
        std::hint::black_box(pool.install(|| scan(&maps)));
    };
    open_and_scan();
    let floor = best(options.reps.max(3), open_and_scan);
    let out_root = options.out.clone().unwrap_or_else(|| dir.clone());
    std::fs::create_dir_all(&out_root).expect("output folder");
    let output_bytes = input_bytes / 3;
    let write_floor = best(options.reps.max(3), || write_floor(&out_root, output_bytes));
    println!(
        "read floor (parallel scan of the memory-mapped inputs): {:.3} s, {:.2} GB/s",
        floor.as_secs_f64(),
        input_bytes as f64 / floor.as_secs_f64() / 1e9
    );
    println!(
        "write floor ({:.2} GB written and fsynced in {}): {:.3} s, {:.2} GB/s\n",
        output_bytes as f64 / 1e9,
        out_root.display(),
        write_floor.as_secs_f64(),
        output_bytes as f64 / write_floor.as_secs_f64() / 1e9
    );
    println!("| method | wall s | input GB/s | read floor ÷ wall | (read + write floor) ÷ wall | peak RSS MB |");
    println!("|---|---:|---:|---:|---:|---:|");
    for method in &options.methods {
        let config = dir.join(format!("{method}.yaml"));
        std::fs::write(&config, config_text(method)).expect("write config");
        let out = out_root.join(format!("merged-{method}"));
        let mut peak = 0u64;
        let wall = best(options.reps, || {
            let mut command = Command::new(std::env::current_exe().expect("own path"));
            command.arg("--child").arg(&config).arg(&out);
            command.arg(options.threads.map_or("all".to_string(), |t| t.to_string()));
            if let Some(bytes) = family.options.shard_bytes {
                command.arg(bytes.to_string());
            }
            let output = command.output().expect("run the merge");
            assert!(
                output.status.success(),
                "{method} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let rss: u64 = String::from_utf8_lossy(&output.stdout)
                .trim()
                .parse()
                .expect("child prints its peak RSS");
            peak = peak.max(rss);
        });
        let _ = std::fs::remove_dir_all(&out);
        println!(
            "| {method} | {:.3} | {:.2} | {:.3} | {:.3} | {} |",
            wall.as_secs_f64(),
            input_bytes as f64 / wall.as_secs_f64() / 1e9,
            floor.as_secs_f64() / wall.as_secs_f64(),
            (floor + write_floor).as_secs_f64() / wall.as_secs_f64(),
            peak / 1_000_000
        );
    }
}

/// Writes the family once; later runs reuse it (a marker file is written last).
fn ensure_family(dir: &Path, shape: &LlamaShape, family: FamilyOptions) -> bool {
    let marker = dir.join("complete");
    if marker.exists() {
        return false;
    }
    let _ = std::fs::remove_dir_all(dir);
    write_family_with(dir, shape, Dtype::BF16, 1, 7, family).expect("generate the family");
    std::fs::write(&marker, b"").expect("marker");
    true
}

/// Records `A.gram.stats.safetensors` and `B.gram.stats.safetensors` (the
/// native LLaMA probe, `--gram`, on a fixed random probe set) unless present.
fn ensure_grams(dir: &Path, vocab: usize) {
    let probe = dir.join("gram-probe.jsonl");
    let mut rng = flatmerge::demo::Rng::new(3, "throughput probe");
    let examples: Vec<ProbeExample> = (0..8)
        .map(|_| ProbeExample {
            input: ProbeInput::Tokens(
                (0..64)
                    .map(|_| (rng.next_u64() % vocab as u64) as u32)
                    .collect(),
            ),
            modality: 0,
            source: String::new(),
            token_modality: None,
            meta: None,
        })
        .collect();
    write_probe_set(&probe, &examples).expect("write the probe set");
    for model in ["A", "B"] {
        let out = dir.join(format!("{model}.gram.stats.safetensors"));
        if out.exists() {
            continue;
        }
        let started = Instant::now();
        let options = ProbeOptions {
            gram: true,
            max_examples: Some(0),
            ..ProbeOptions::default()
        };
        probe_files(&dir.join(model), &probe, &out, &options).expect("record Grams");
        println!(
            "(recorded {model}'s Grams for regmean in {:.1} s)",
            started.elapsed().as_secs_f64()
        );
    }
}

/// The merge config of `method` over the generated family (mergekit's
/// documented parameters; SAFE-M at the SPEC defaults).
fn config_text(method: &str) -> String {
    let models = "models:\n  - model: ./A\n    parameters: {weight: 0.5, density: 0.2}\n  - model: ./B\n    parameters: {weight: 0.5, density: 0.2}\n";
    let base = "base_model: ./C\n";
    match method {
        "safe_m" => format!("merge_method: safe_m\n{base}base_model_stats: ./C.stats.safetensors\nmodels:\n  - model: ./A\n    stats: ./A.stats.safetensors\n  - model: ./B\n    stats: ./B.stats.safetensors\n"),
        "regmean" => "merge_method: regmean\nmodels:\n  - model: ./A\n    stats: ./A.gram.stats.safetensors\n  - model: ./B\n    stats: ./B.gram.stats.safetensors\n".to_string(),
        "linear" => "merge_method: linear\nmodels:\n  - model: ./A\n    parameters: {weight: 0.5}\n  - model: ./B\n    parameters: {weight: 0.5}\n  - model: ./C\n    parameters: {weight: 0.5}\n".to_string(),
        // SPEC §8's methods take no weights or densities: the defaults.
        "tsv" | "iso_c" | "iso_cts" | "wudi" => {
            format!("merge_method: {method}\n{base}models:\n  - model: ./A\n  - model: ./B\n")
        }
        _ => format!("merge_method: {method}\n{base}{models}"),
    }
}

/// XOR of every 8-byte word of the inputs, in parallel 1 MiB blocks: the
/// least work that touches every byte.
fn scan(maps: &[Checkpoint]) -> u64 {
    maps.iter()
        .flat_map(|c| c.tensors().iter().filter_map(|t| c.view(&t.name)))
        .map(|view| {
            let bytes = view.data;
            bytes
                .par_chunks(1 << 20)
                .map(|block| {
                    block.chunks_exact(8).fold(0u64, |acc, w| {
                        acc ^ u64::from_le_bytes(w.try_into().unwrap())
                    })
                })
                .reduce(|| 0, |a, b| a ^ b)
        })
        .fold(0, |a, b| a ^ b)
}

/// Writes `bytes` bytes to a new file under `dir` in 8 MiB writes and
/// fsyncs it, as the merge's writer does with its output; removes it.
fn write_floor(dir: &Path, bytes: u64) {
    use std::io::Write;
    let path = dir.join("write-floor.tmp");
    let block = vec![0x5au8; 8 << 20];
    let mut file = std::fs::File::create(&path).expect("write floor file");
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        file.write_all(&block[..n]).expect("write");
        left -= n as u64;
    }
    file.sync_all().expect("fsync");
    drop(file);
    std::fs::remove_file(&path).expect("remove");
}

fn best(reps: usize, mut f: impl FnMut()) -> Duration {
    (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .min()
        .unwrap_or_default()
}

/// The merge as `flatmerge merge --force` runs it; prints the peak RSS
/// (bytes). Arguments: config, output, threads (`all` or N), and the
/// largest shard in bytes when the output is sharded.
fn child(args: &[String]) {
    let config = MergeConfig::from_file(Path::new(&args[0])).expect("config");
    let options = MergeOptions {
        out_dir: PathBuf::from(&args[1]),
        threads: args
            .get(2)
            .filter(|t| *t != "all")
            .map(|t| t.parse().expect("threads")),
        max_shard_bytes: args.get(3).map(|b| b.parse().expect("shard bytes")),
        force: true,
        ..MergeOptions::default()
    };
    PreparedMerge::new(config)
        .and_then(|m| m.run(&options))
        .unwrap_or_else(|e| panic!("{e}"));
    println!("{}", peak_resident_bytes().unwrap_or(0));
}
