//! `flatmerge probe` and `flatmerge probe-set`: parse the arguments, call
//! `flatmerge::probe`, print what it did.

use clap::{Args, Subcommand};
use flatmerge::probe::{probe_files, set, ProbeOptions};
use flatmerge::Error;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Args)]
pub struct ProbeArgs {
    /// The model directory (an MLP: flatmerge_mlp.json beside model.safetensors).
    model: PathBuf,
    /// The probe set: JSON Lines, one example per line ({"input": [...]} for an MLP).
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
    /// No summary.
    #[arg(short, long)]
    quiet: bool,
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

pub fn probe(args: ProbeArgs) -> Result<(), Error> {
    let options = ProbeOptions {
        max_examples: args.max_examples,
        threads: args.threads,
        ..ProbeOptions::default()
    };
    let summary = probe_files(&args.model, &args.probe_set, &args.output, &options)?;
    if !args.quiet {
        println!(
            "{}: ran {} examples through the {} ({} layers); rows for {} examples; wrote {}",
            args.model.display(),
            summary.examples,
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
