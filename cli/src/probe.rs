//! `flatmerge probe` and `flatmerge probe-set`: parse the arguments, call
//! `flatmerge::probe`, print what it did.

use clap::{Args, Subcommand};
use flatmerge::probe::{probe_files, set, ProbeOptions, ProbeProgress};
use flatmerge::Error;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args)]
pub struct ProbeArgs {
    /// The model directory (an MLP: flatmerge_mlp.json beside model.safetensors).
    model: PathBuf,
    /// The probe set: JSON Lines, one example per line ({"input": [...]} for an MLP,
    /// {"tokens": [...]} or, built with the `tokenizers` feature, {"text": "..."} for a LLaMA).
    #[arg(long, value_name = "FILE")]
    probe_set: PathBuf,
    /// The statistics file to write (replaced if it exists).
    #[arg(short = 'o', long = "output", value_name = "STATS")]
    output: PathBuf,
    /// Keep per-example rows for the first N examples (default: all; 0: means only).
    #[arg(long, value_name = "N")]
    max_examples: Option<usize>,
    /// Worker threads (default: all cores); the statistics are identical for any count.
    #[arg(long)]
    threads: Option<usize>,
    /// Also record each linear layer's input second moment `x_gram` (SPEC §4
    /// version 2), for least-squares merging (`merge_method: regmean`).
    #[arg(long)]
    gram: bool,
    /// With --gram: Grams only for the decoder layers (MLP layers) A..B, half-open,
    /// to bound memory; record the other ranges in further runs with --part and combine them.
    #[arg(long, value_name = "A..B", value_parser = parse_range, requires = "gram")]
    gram_layers: Option<std::ops::Range<usize>>,
    /// Record only the probe examples whose `source` is one of these (comma-separated):
    /// a model's own task, as RegMean's protocol asks.
    #[arg(long, value_name = "S1,S2", value_delimiter = ',')]
    sources: Option<Vec<String>>,
    /// Write the recorder's exact partial state (a `.part` file) for `flatmerge stats combine`.
    #[arg(long)]
    part: bool,
    /// No progress bar, no summary.
    #[arg(short, long)]
    quiet: bool,
}

fn parse_range(text: &str) -> Result<std::ops::Range<usize>, String> {
    let (a, b) = text
        .split_once("..")
        .ok_or_else(|| format!("`{text}` is not a range A..B"))?;
    let (a, b): (usize, usize) = match (a.trim().parse(), b.trim().parse()) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return Err(format!("`{text}` is not a range A..B of layer indices")),
    };
    if a >= b {
        return Err(format!("`{text}` is empty: A must be below B"));
    }
    Ok(a..b)
}

/// `flatmerge stats …`: statistics files.
#[derive(Subcommand)]
pub enum StatsCommand {
    /// Combine recordings of disjoint examples (`probe --part` files) exactly into the
    /// file of their union: byte-identical to one recording of all the examples.
    Combine(CombineArgs),
}

#[derive(Args)]
pub struct CombineArgs {
    /// The `.part` files.
    #[arg(required = true, num_args = 2..)]
    parts: Vec<PathBuf>,
    /// The statistics file to write (a `.part` output stays combinable).
    #[arg(short = 'o', long = "output", value_name = "STATS")]
    output: PathBuf,
}

pub fn stats(command: StatsCommand) -> Result<(), Error> {
    match command {
        StatsCommand::Combine(args) => {
            flatmerge::recorder::combine_parts(&args.parts, &args.output)?;
            println!(
                "combined {} recordings into {}",
                args.parts.len(),
                args.output.display()
            );
            Ok(())
        }
    }
}

#[derive(Subcommand)]
pub enum ProbeSetCommand {
    /// Draw the meta-probe mixture: a quota of examples per source, shuffled, from a seed.
    Sample(SampleArgs),
}

#[derive(Args)]
pub struct SampleArgs {
    /// Probe sets to draw from; an example without "source" takes its file's stem.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// The quota of every source without a --quota (default: such sources are left out).
    #[arg(long, value_name = "N")]
    per_source: Option<usize>,
    /// The quota of one source (repeatable).
    #[arg(long, value_name = "SOURCE=N", value_parser = parse_quota)]
    quota: Vec<(String, usize)>,
    /// Seed of the draw and the shuffle; the same seed gives the same mixture.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The mixture to write (JSON Lines; replaced if it exists).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: PathBuf,
    /// No summary.
    #[arg(short, long)]
    quiet: bool,
}

fn parse_quota(text: &str) -> Result<(String, usize), String> {
    let (source, n) = text
        .rsplit_once('=')
        .ok_or_else(|| format!("`{text}` is not SOURCE=N"))?;
    let n = n
        .parse()
        .map_err(|_| format!("`{n}` in `{text}` is not a count"))?;
    Ok((source.to_string(), n))
}

/// A progress bar of examples on stderr, or nothing when quiet or stderr
/// is not a terminal.
fn probe_progress_bar(quiet: bool) -> Option<ProgressBar> {
    if quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} examples {msg} [{elapsed}, eta {eta}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    Some(bar)
}

/// `tokens` over `seconds`, for display (0 when no time passed).
fn tokens_per_second(tokens: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        tokens as f64 / seconds
    } else {
        0.0
    }
}

pub fn probe(args: ProbeArgs) -> Result<(), Error> {
    let bar = probe_progress_bar(args.quiet);
    let progress = bar.clone().map(|bar| {
        Arc::new(move |p: ProbeProgress| {
            bar.set_length(p.examples_total as u64);
            bar.set_position(p.examples_done as u64);
            let rate = tokens_per_second(p.tokens_done, bar.elapsed().as_secs_f64());
            bar.set_message(format!("{} tokens, {rate:.0} tokens/s", p.tokens_done));
        }) as Arc<flatmerge::probe::ProgressFn>
    });
    let options = ProbeOptions {
        max_examples: args.max_examples,
        threads: args.threads,
        progress,
        gram: args.gram,
        gram_blocks: args.gram_layers,
        sources: args.sources,
        part: args.part,
        ..ProbeOptions::default()
    };
    let result = probe_files(&args.model, &args.probe_set, &args.output, &options);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let summary = result?;
    if !args.quiet {
        println!(
            "{}: ran {} examples ({} tokens, {:.0} tokens/s) through the {} ({} layers); rows \
             for {} examples; wrote {}",
            args.model.display(),
            summary.examples,
            summary.tokens,
            tokens_per_second(summary.tokens, summary.seconds),
            summary.model,
            summary.layers,
            summary.rows,
            summary.output.display()
        );
    }
    Ok(())
}

pub fn probe_set(command: ProbeSetCommand) -> Result<(), Error> {
    match command {
        ProbeSetCommand::Sample(args) => sample(args),
    }
}

fn sample(args: SampleArgs) -> Result<(), Error> {
    let examples = set::read_sources(&args.files)?;
    let quotas = set::Quotas {
        default: args.per_source,
        per_source: args.quota.into_iter().collect(),
    };
    let mixture = set::sample_mixture(&examples, &quotas, args.seed)?;
    set::write_probe_set(&args.output, &mixture)?;
    if !args.quiet {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for e in &mixture {
            *counts.entry(&e.source).or_default() += 1;
        }
        let counts: Vec<String> = counts.iter().map(|(s, n)| format!("{s} {n}")).collect();
        println!(
            "wrote {} examples ({}) to {}",
            mixture.len(),
            counts.join(", "),
            args.output.display()
        );
    }
    Ok(())
}
