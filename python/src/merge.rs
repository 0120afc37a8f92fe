//! Merges, plans, `inspect` and the probe-set sampler.
//!
//! A merge runs on a thread of its own while the calling thread, with the
//! GIL released between polls, waits for its progress events: the calling
//! thread (the main thread, for a script) is the only one where
//! `check_signals` sees Ctrl-C, and progress callbacks then run on the
//! caller's thread, as Python code expects.

use crate::errors::{invalid, to_py, IntoPy};
use engine::config::MergeConfig;
use engine::engine::{MergeOptions, PreparedMerge, Progress};
use engine::inspect;
use engine::io::Checkpoint;
use engine::probe::set;
use engine::stats::ActivationStats;
use engine::{Error, ErrorKind};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

/// How often the waiting thread looks for Ctrl-C.
const POLL: Duration = Duration::from_millis(50);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    m.add_function(wrap_pyfunction!(plan, m)?)?;
    m.add_function(wrap_pyfunction!(inspect_path, m)?)?;
    m.add_function(wrap_pyfunction!(sample, m)?)?;
    Ok(())
}

/// The config from a file (`path`) or from YAML text (`yaml`, relative
/// paths against `base_dir`).
fn load(path: Option<&str>, yaml: Option<&str>, base_dir: &str) -> engine::Result<MergeConfig> {
    match (path, yaml) {
        (Some(path), None) => MergeConfig::from_file(Path::new(path)),
        (None, Some(text)) => MergeConfig::from_yaml(text, Path::new(base_dir), None),
        _ => Err(Error::new(
            ErrorKind::InvalidInput,
            "give exactly one of a config path and YAML text",
        )),
    }
}

/// What the merge thread tells the waiting one.
struct Event {
    tensors_done: usize,
    tensors_total: usize,
    bytes_done: u64,
    bytes_total: u64,
    tensor: String,
}

/// A panic's message, for the error that replaces it.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Merges the config into `out_dir`; `progress(tensors_done,
/// tensors_total, bytes_done, bytes_total, tensor)` is called on the
/// caller's thread after each tensor, and a true return value cancels.
#[pyfunction]
#[pyo3(signature = (out_dir, *, path=None, yaml=None, base_dir=".", threads=None, force=false, out_dtype=None, progress=None))]
#[allow(clippy::too_many_arguments)]
fn merge(
    py: Python<'_>,
    out_dir: PathBuf,
    path: Option<String>,
    yaml: Option<String>,
    base_dir: &str,
    threads: Option<usize>,
    force: bool,
    out_dtype: Option<&str>,
    progress: Option<Bound<'_, PyAny>>,
) -> PyResult<PathBuf> {
    if threads == Some(0) {
        return Err(invalid("`threads` is 0; give None for every core"));
    }
    let dtype = match out_dtype {
        None => None,
        Some(name) => Some(engine::dtype::Dtype::parse_float(name).ok_or_else(|| {
            invalid(format!(
                "`out_dtype` `{name}` is not bfloat16, float16 or float32"
            ))
        })?),
    };
    let mut config = load(path.as_deref(), yaml.as_deref(), base_dir).py_err()?;
    if dtype.is_some() {
        config.out_dtype = dtype;
    }
    let cancel = AtomicBool::new(false);
    let (tx, mut rx) = mpsc::channel::<Event>();
    let mut interrupted: Option<PyErr> = None;
    let result = std::thread::scope(|s| {
        let cancel = &cancel;
        let out = out_dir.clone();
        let worker = s.spawn(move || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let prepared = PreparedMerge::new(config)?;
                let on_progress = |p: &Progress<'_>| {
                    // The receiver is gone only after this thread ends.
                    let _ = tx.send(Event {
                        tensors_done: p.tensors_done,
                        tensors_total: p.tensors_total,
                        bytes_done: p.bytes_done,
                        bytes_total: p.bytes_total,
                        tensor: p.tensor.to_string(),
                    });
                };
                prepared.run(&MergeOptions {
                    out_dir: out,
                    max_shard_bytes: None,
                    threads,
                    force,
                    progress: Some(&on_progress),
                    cancel: Some(cancel),
                    ..MergeOptions::default()
                })
            }))
        });
        loop {
            // A receiver is not `Sync`: it moves to the GIL-free wait and back.
            let (event, back) = py.detach(move || (rx.recv_timeout(POLL), rx));
            rx = back;
            match event {
                Ok(event) => {
                    if let (Some(callback), None) = (&progress, &interrupted) {
                        let outcome = callback
                            .call1((
                                event.tensors_done,
                                event.tensors_total,
                                event.bytes_done,
                                event.bytes_total,
                                event.tensor,
                            ))
                            .and_then(|r| r.is_truthy());
                        match outcome {
                            Ok(false) => {}
                            Ok(true) => cancel.store(true, Ordering::Relaxed),
                            Err(e) => {
                                interrupted = Some(e);
                                cancel.store(true, Ordering::Relaxed);
                            }
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if interrupted.is_none() {
                if let Err(e) = py.check_signals() {
                    interrupted = Some(e);
                    cancel.store(true, Ordering::Relaxed);
                }
            }
        }
        py.detach(|| worker.join())
    });
    // The callback's exception or KeyboardInterrupt comes first: the merge
    // stopped because of it (and removed its temporary files).
    if let Some(e) = interrupted {
        return Err(e);
    }
    match result {
        Ok(Ok(Ok(_summary))) => Ok(out_dir),
        Ok(Ok(Err(e))) => Err(to_py(e)),
        Ok(Err(payload)) | Err(payload) => Err(to_py(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "internal error (a bug in flatmerge; please report it): {}",
                panic_message(payload.as_ref())
            ),
        ))),
    }
}

/// The plan of the config as JSON: `{"tensors": [...], "dropped": [...],
/// "layers": n, "groups": [...]}`. Every input is opened and checked.
#[pyfunction]
#[pyo3(signature = (*, path=None, yaml=None, base_dir="."))]
fn plan(
    py: Python<'_>,
    path: Option<String>,
    yaml: Option<String>,
    base_dir: &str,
) -> PyResult<String> {
    py.detach(|| {
        let config = load(path.as_deref(), yaml.as_deref(), base_dir)?;
        let prepared = PreparedMerge::new(config)?;
        let mut value = serde_json::to_value(prepared.plan())
            .map_err(|e| Error::new(ErrorKind::InvalidInput, e.to_string()))?;
        value["input_bytes"] = json!(prepared.input_bytes());
        value["out_bytes"] = json!(prepared.plan().out_bytes());
        Ok(value.to_string())
    })
    .py_err()
}

/// What `flatmerge inspect` shows, as JSON: a checkpoint's tensors, or a
/// statistics file's layers.
#[pyfunction(name = "inspect")]
fn inspect_path(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    py.detach(|| {
        if inspect::is_stats_file(&path) {
            return inspect_stats(&path);
        }
        let checkpoint = Checkpoint::open(&path)?;
        let summary = inspect::summarize(&checkpoint);
        let tensors: Vec<Value> = checkpoint
            .tensors()
            .iter()
            .map(|t| json!({"name": t.name, "dtype": t.dtype, "shape": t.shape}))
            .collect();
        let by_dtype: BTreeMap<String, Value> = summary
            .by_dtype
            .iter()
            .map(|(d, (n, p))| (d.to_string(), json!({"tensors": n, "parameters": p})))
            .collect();
        Ok(json!({
            "kind": "checkpoint",
            "path": path,
            "tensors": tensors,
            "parameters": summary.parameters,
            "bytes": summary.bytes,
            "shards": summary.shards,
            "by_dtype": by_dtype,
        })
        .to_string())
    })
    .py_err()
}

fn inspect_stats(path: &Path) -> engine::Result<String> {
    let stats = ActivationStats::load(path)?;
    let layers: BTreeMap<&str, Value> = stats
        .layers
        .iter()
        .map(|(name, l)| {
            let width = |v: &Option<Vec<f32>>| v.as_ref().map(Vec::len);
            (
                name.as_str(),
                json!({
                    "in_features": width(&l.x_mean),
                    "out_features": width(&l.y_mean),
                    "count": l.count,
                    "rows": l.x_rows.as_ref().map(|r| r.rows),
                    "gram": stats.gram(name).map(|g| g.width()),
                    "gram_owner": stats.gram(name).map(|_| stats.gram_owner(name)),
                }),
            )
        })
        .collect();
    Ok(json!({
        "kind": "stats",
        "path": path,
        "examples": stats.examples,
        "model": stats.model,
        "probe": stats.probe,
        "modality": stats.modality,
        "sources": stats.sources,
        "layers": layers,
    })
    .to_string())
}

/// The mixture sampler: JSON lines of the drawn examples, written to
/// `output` too when given.
#[pyfunction]
#[pyo3(signature = (files, *, per_source=None, quotas=None, seed=0, output=None))]
fn sample(
    py: Python<'_>,
    files: Vec<PathBuf>,
    per_source: Option<usize>,
    quotas: Option<Bound<'_, PyDict>>,
    seed: u64,
    output: Option<PathBuf>,
) -> PyResult<Vec<String>> {
    let mut per = BTreeMap::new();
    if let Some(quotas) = quotas {
        for (k, v) in quotas.iter() {
            per.insert(k.extract::<String>()?, v.extract::<usize>()?);
        }
    }
    py.detach(|| {
        let examples = set::read_sources(&files)?;
        let quotas = set::Quotas {
            default: per_source,
            per_source: per,
        };
        let mixture = set::sample_mixture(&examples, &quotas, seed)?;
        if let Some(output) = &output {
            set::write_probe_set(output, &mixture)?;
        }
        Ok(mixture.iter().map(|e| e.to_json_line()).collect())
    })
    .py_err()
}
