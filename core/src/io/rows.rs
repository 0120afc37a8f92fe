//! Tensors seen with their rows rearranged: a model's embedding and output
//! rows mapped into the merged vocabulary ([`crate::vocab`]), while the
//! model is read; and tensors stacked from the rows of several of one
//! checkpoint (a name map's `concat`: LLaVA's q, k and v seen as CogVLM's
//! fused `query_key_value`, [`Checkpoint::stack`]).
//!
//! A [`TensorView`](super::TensorView) of a mapped tensor carries [`Rows`]
//! beside its own bytes, and every decode builds the rows it covers from
//! their sources: a row of one of the merge's models (its own included),
//! the mean of several, zeros, or the model's mean row for padding. Nothing
//! is materialised: memory is one row of scratch per read, plus the padding
//! row once per tensor when the vocabulary is padded.
//!
//! Determinism: a row's value depends only on its sources, read in their
//! fixed order and summed in f64, whichever range a read covers.

use super::Checkpoint;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// Where one output row comes from. Donors are indices into the merge
/// part's models ([`RowMaps::new`]).
#[derive(Debug, Clone, PartialEq)]
pub enum RowSource {
    /// Row `row` of donor `donor`'s tensor of the same name.
    Row {
        /// The donor.
        donor: usize,
        /// Its row.
        row: usize,
    },
    /// The mean of these rows (each `(donor, row)`), in this order.
    Mean(Vec<(usize, usize)>),
    /// Zeros.
    Zero,
    /// The mean of this tensor's mapped rows before the padding (mergekit's
    /// padding rows).
    PadMean,
}

/// One tensor's map: its output rows' sources.
#[derive(Debug)]
pub struct RowMap {
    cols: usize,
    sources: Vec<RowSource>,
    /// The first padding row (the mean covers the rows before it).
    pad_from: usize,
    pad_mean: OnceLock<Vec<f32>>,
}

impl RowMap {
    /// A map of `sources.len()` rows of `cols` values; rows from `pad_from`
    /// on are expected to be [`RowSource::PadMean`].
    pub fn new(cols: usize, sources: Vec<RowSource>, pad_from: usize) -> RowMap {
        RowMap {
            cols,
            sources,
            pad_from,
            pad_mean: OnceLock::new(),
        }
    }

    /// Number of output rows.
    pub fn rows(&self) -> usize {
        self.sources.len()
    }
}

/// The mapped tensors of one checkpoint, and the checkpoints their rows
/// come from (opened apart from the merge's own views, without maps).
#[derive(Debug)]
pub struct RowMaps {
    tensors: HashMap<String, RowMap>,
    donors: Arc<Vec<Checkpoint>>,
}

impl RowMaps {
    /// Maps `tensors` (by name), reading rows from `donors`.
    pub fn new(tensors: HashMap<String, RowMap>, donors: Arc<Vec<Checkpoint>>) -> RowMaps {
        RowMaps { tensors, donors }
    }

    pub(crate) fn get(&self, name: &str) -> Option<&RowMap> {
        self.tensors.get(name)
    }

    pub(crate) fn rows<'a>(&'a self, name: &'a str) -> Option<Rows<'a>> {
        Some(Rows {
            kind: Kind::Mapped(Mapped {
                map: self.tensors.get(name)?,
                donors: &self.donors,
                name,
            }),
        })
    }

    /// Drops the donors' mappings of `name` (see [`Checkpoint::release`]).
    pub(crate) fn release(&self, name: &str) {
        if self.tensors.contains_key(name) {
            for donor in self.donors.iter() {
                donor.release(name);
            }
        }
    }
}

/// A mapped or stacked tensor's rows, for
/// [`TensorView::read_f32`](super::TensorView::read_f32).
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    kind: Kind<'a>,
}

#[derive(Debug, Clone, Copy)]
enum Kind<'a> {
    /// Rows mapped into another vocabulary.
    Mapped(Mapped<'a>),
    /// The parts' rows one after the other: each `(name, elements)` of
    /// `checkpoint`, read through its own view (a LoRA update included).
    Stacked {
        checkpoint: &'a Checkpoint,
        parts: &'a [(String, usize)],
    },
}

#[derive(Debug, Clone, Copy)]
struct Mapped<'a> {
    map: &'a RowMap,
    donors: &'a [Checkpoint],
    name: &'a str,
}

impl<'a> Rows<'a> {
    /// The rows of `parts` of `checkpoint`, stacked in order.
    pub(crate) fn stacked(checkpoint: &'a Checkpoint, parts: &'a [(String, usize)]) -> Rows<'a> {
        Rows {
            kind: Kind::Stacked { checkpoint, parts },
        }
    }

    /// A stacked tensor's parts, in order (empty for mapped rows).
    pub fn parts(&self) -> impl Iterator<Item = &'a str> {
        let parts: &'a [(String, usize)] = match self.kind {
            Kind::Stacked { parts, .. } => parts,
            Kind::Mapped(_) => &[],
        };
        parts.iter().map(|(name, _)| name.as_str())
    }

    /// Writes elements `[start, start + out.len())` of the tensor.
    pub fn read(&self, start: usize, out: &mut [f32]) {
        match self.kind {
            Kind::Mapped(m) => m.read(start, out),
            Kind::Stacked { checkpoint, parts } => {
                // Element offsets: the parts' rows are contiguous in order, so
                // a range splits into one range per part it covers.
                let (mut at, mut done, mut offset) = (start, 0, 0);
                for (name, len) in parts {
                    if done == out.len() {
                        break;
                    }
                    if at < offset + len {
                        let n = (offset + len - at).min(out.len() - done);
                        let view = checkpoint
                            .view(name)
                            .expect("parts are checked when the tensor is stacked");
                        view.read_f32(at - offset, &mut out[done..done + n]);
                        at += n;
                        done += n;
                    }
                    offset += len;
                }
            }
        }
    }
}

impl Mapped<'_> {
    fn read(&self, start: usize, out: &mut [f32]) {
        let cols = self.map.cols;
        let mut at = start;
        let mut done = 0;
        let mut scratch = Vec::new();
        while done < out.len() {
            let (row, col) = (at / cols, at % cols);
            let len = (cols - col).min(out.len() - done);
            let dst = &mut out[done..done + len];
            self.row(row, col, dst, &mut scratch);
            at += len;
            done += len;
        }
    }

    fn donor_row(&self, donor: usize, row: usize, col: usize, dst: &mut [f32]) {
        let view = self.donors[donor]
            .view(self.name)
            .expect("donor tensors are checked when the map is built");
        view.read_f32(row * self.map.cols + col, dst);
    }

    /// Columns `[col, col + dst.len())` of output row `row`.
    fn row(&self, row: usize, col: usize, dst: &mut [f32], scratch: &mut Vec<f32>) {
        match &self.map.sources[row] {
            RowSource::Row { donor, row } => self.donor_row(*donor, *row, col, dst),
            RowSource::Zero => dst.fill(0.0),
            RowSource::Mean(rows) => {
                let mut sum = vec![0.0f64; dst.len()];
                scratch.resize(dst.len(), 0.0);
                for &(donor, r) in rows {
                    self.donor_row(donor, r, col, scratch);
                    for (s, x) in sum.iter_mut().zip(scratch.iter()) {
                        *s += *x as f64;
                    }
                }
                let n = rows.len() as f64;
                for (d, s) in dst.iter_mut().zip(sum) {
                    *d = (s / n) as f32;
                }
            }
            RowSource::PadMean => {
                let mean = self.map.pad_mean.get_or_init(|| self.mean_row());
                dst.copy_from_slice(&mean[col..col + dst.len()]);
            }
        }
    }

    /// The mean of the rows before the padding, summed in row order.
    fn mean_row(&self) -> Vec<f32> {
        let cols = self.map.cols;
        let rows = self.map.pad_from;
        let mut sum = vec![0.0f64; cols];
        let mut row = vec![0.0f32; cols];
        let mut scratch = Vec::new();
        for r in 0..rows {
            self.row(r, 0, &mut row, &mut scratch);
            for (s, x) in sum.iter_mut().zip(&row) {
                *s += *x as f64;
            }
        }
        sum.into_iter()
            .map(|s| (s / rows.max(1) as f64) as f32)
            .collect()
    }
}
