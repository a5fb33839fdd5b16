//! # output-projector
//!
//! The NExT-GPT output projector — a small Transformer that maps an LLM's hidden
//! states at signal tokens (`[IMG0]..`, `[VID0]..`, `[AUD0]..`) into the
//! conditioning space of a frozen diffusion model — with hand-written GPU kernels
//! and a naive, float64, PyTorch-exact CPU reference that every kernel is
//! verified against.
//!
//! The pieces:
//! - [`ops::Backend`]: the op set (linear, layer_norm, attention, alignment_loss,
//!   gather_signal_tokens) that every backend implements.
//! - [`reference::Reference`]: the CPU oracle.
//! - [`projector::Projector`]: the model, written once, generic over the backend.
//! - [`weights`]: safetensors checkpoints with PyTorch's state-dict names.

#![warn(missing_docs)]

pub mod bench;
pub mod config;
pub mod device;
pub mod error;
pub mod golden;
pub mod ops;
pub mod profile;
pub mod projector;
pub mod reference;
pub mod rng;
pub mod signal;
pub mod tensor;
pub mod verify;
pub mod weights;

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "wgpu")]
pub mod wgpu;

pub use error::{Error, Result};

// The README's examples are compiled and run as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
