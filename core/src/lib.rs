//! flatmerge: merging fine-tuned neural-network checkpoints on CPU.
//!
//! The crate has two layers:
//! - the **numeric core** (always built, `no_std` + `alloc` without the
//!   `std` feature): every formula of `SPEC.md` as a plain function on
//!   slices — [`safe_m`], [`select`], [`reduce`], [`dtype`], and
//!   least-squares merging ([`least_squares`]) and data-free subspace
//!   merging ([`subspace`]), and mergekit's spherical ([`sphere`]) and
//!   element-selecting ([`consensus`]) merges;
//! - the **std layer** (feature `std`, on by default): memory-mapped
//!   safetensors checkpoints ([`io`]), activation statistics files
//!   ([`stats`]), merge configs ([`config`]), the plan ([`plan`]), the
//!   method registry ([`methods`], one module per method), the
//!   streaming engine ([`engine`]), the merge report ([`report`]), the
//!   activation [`recorder`], native probes ([`probe`]) and a
//!   self-contained [`demo`].
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(missing_docs)]

extern crate alloc;

pub mod assignment;
pub mod baselines;
pub mod consensus;
pub mod dtype;
pub mod fam;
pub mod least_squares;
pub mod reduce;
pub mod safe_m;
pub mod select;
pub mod simd;
pub mod sphere;
pub mod subspace;

#[cfg(feature = "std")]
pub mod chat_template;
#[cfg(feature = "std")]
pub mod config;
#[cfg(feature = "std")]
pub mod demo;
#[cfg(feature = "std")]
pub mod engine;
#[cfg(feature = "std")]
pub mod error;
#[cfg(feature = "std")]
pub mod groups;
#[cfg(feature = "std")]
pub mod inspect;
#[cfg(feature = "std")]
pub mod io;
#[cfg(feature = "std")]
pub mod layers;
#[cfg(feature = "std")]
pub mod methods;
#[cfg(feature = "std")]
pub mod modules;
#[cfg(feature = "std")]
pub mod namemap;
#[cfg(feature = "std")]
pub mod plan;
#[cfg(feature = "std")]
pub mod probe;
#[cfg(feature = "std")]
pub mod recorder;
#[cfg(feature = "std")]
pub mod report;
#[cfg(feature = "std")]
pub mod stats;
#[cfg(feature = "std")]
pub mod vocab;

#[cfg(feature = "std")]
pub use error::{Error, ErrorKind, Result};

/// The version of this library, as in `Cargo.toml`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
