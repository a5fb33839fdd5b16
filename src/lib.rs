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
//! - [`weights`]: checkpoints (safetensors, or PyTorch's `torch.save`) with PyTorch's
//!   state-dict names.
//! - [`cuda::Cuda`] and [`wgpu::Wgpu`]: the GPU backends (features `cuda` and
//!   `wgpu`, both on by default; neither needs a GPU or a CUDA toolkit to build).
//!
//! # Example
//!
//! The audio projector on the CPU reference, with seeded random weights; a real
//! checkpoint comes from [`weights::ProjectorWeights::load`], and the same code
//! runs on a GPU with `Cuda::open()?` or `Wgpu::open()?` in place of `Reference`.
//!
//! ```
//! use output_projector::config::{Modality, ProjectorConfig, Variant};
//! use output_projector::ops::Backend;
//! use output_projector::projector::Projector;
//! use output_projector::reference::Reference;
//! use output_projector::tensor::HostTensor;
//! use output_projector::weights::ProjectorWeights;
//!
//! # fn main() -> output_projector::Result<()> {
//! let mut config = ProjectorConfig::preset(Modality::Audio, Variant::Legacy);
//! config.in_dim = 32; // the LLM's hidden size (4096 for Vicuna-7B); small here
//! let weights = ProjectorWeights::random(config, Some(Modality::Audio), 7)?;
//! let projector = Projector::new(Reference, &weights)?;
//!
//! // The LLM's hidden states at the 8 [AUD] tokens of one answer: [1, 8, in_dim].
//! let hidden = HostTensor::from_f32(vec![1, 8, 32], vec![0.5; 8 * 32])?;
//! let h = projector.backend().upload(&hidden)?;
//! let clap = projector.backend().download(&projector.forward(&h, None)?)?;
//! assert_eq!(clap.shape(), &[1, 1, 512]); // AudioLDM's conditioning
//!
//! // Wrong shapes are errors that say what was expected, never panics.
//! let short = projector.backend().upload(&HostTensor::from_f32(vec![1, 7, 32], vec![0.5; 7 * 32])?)?;
//! assert!(projector.forward(&short, None).is_err());
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod bench;
pub mod config;
pub mod cpu;
pub mod device;
pub mod error;
pub mod golden;
pub mod ops;
#[doc(hidden)]
pub mod parallel;
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

/// What an engine shares between threads, or hands to another: a change that
/// loses it fails to compile here.
#[cfg(test)]
mod thread_safety {
    use crate::ops::Backend;
    use crate::projector::{Plan, Projector};

    fn shared<T: Send + Sync>() {}
    #[cfg(feature = "cuda")]
    fn moved<T: Send>() {}

    fn backend<B: Backend + Send + Sync>()
    where
        B::Tensor: Send + Sync,
        B::Mask: Send + Sync,
    {
        shared::<Projector<B>>();
        shared::<Plan<B::Tensor>>();
    }

    #[test]
    fn projectors_backends_and_tensors_cross_threads() {
        backend::<crate::reference::Reference>();
        backend::<crate::cpu::Cpu>();
        #[cfg(feature = "wgpu")]
        backend::<crate::wgpu::Wgpu>();
        #[cfg(feature = "cuda")]
        {
            backend::<crate::cuda::Cuda>();
            // Launched from one thread at a time, but from any.
            moved::<crate::cuda::ProjectorGraph<'static>>();
        }
        shared::<crate::weights::ProjectorWeights>();
        shared::<crate::weights::TensorFile>();
        shared::<crate::tensor::HostTensor>();
        shared::<crate::signal::SignalPositions>();
        shared::<crate::Error>();
    }
}

// The README's examples are compiled and run as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
