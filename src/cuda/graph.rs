//! A projector forward captured once into a CUDA graph and replayed: one
//! launch on the stream instead of one per kernel, for a fixed batch size.
//!
//! ```no_run
//! # fn main() -> output_projector::Result<()> {
//! use output_projector::config::{Modality, ProjectorConfig, Variant};
//! use output_projector::cuda::Cuda;
//! use output_projector::ops::Backend;
//! use output_projector::projector::Projector;
//! use output_projector::tensor::HostTensor;
//! use output_projector::weights::ProjectorWeights;
//!
//! let config = ProjectorConfig::preset(Modality::Image, Variant::Legacy);
//! let weights = ProjectorWeights::random(config, Some(Modality::Image), 0)?;
//! let cuda = Cuda::open()?;
//! let projector = Projector::new(cuda.clone(), &weights)?;
//! let mut graph = projector.capture(1, 4)?; // batch 1, 4 signal tokens
//! let hidden = cuda.upload(&HostTensor::randn(vec![1, 4, 4096], 7, "hidden")?)?;
//! let conditioning = graph.forward(&hidden)?; // [1, 77, 768], on the device
//! let host = cuda.download(conditioning)?;
//! # Ok(()) }
//! ```

use super::backend::{Cuda, CudaTensor, Graph};
use crate::error::{Error, Result};
use crate::ops::{Backend, Shaped};
use crate::projector::{Plan, Projector};

/// A forward of one projector at one `(batch, n_in)`, recorded as a CUDA
/// graph. It owns its input and output buffers and every buffer in between;
/// the projector's weights are borrowed, so they outlive it.
pub struct ProjectorGraph<'p> {
    // Declared first: the graph is destroyed before the memory it uses.
    graph: Graph,
    projector: &'p Projector<Cuda>,
    plan: Plan<CudaTensor>,
    input: CudaTensor,
    /// The input's address in the capture: `input_mut` allows replacing the
    /// tensor, which the graph would not see.
    input_ptr: u64,
}

impl Projector<Cuda> {
    /// Captures a forward of `batch` rows of `n_in` signal tokens (without
    /// separate input embeddings: add them to `hidden` first). One eager
    /// forward runs first, on zeros: it compiles and loads every kernel and
    /// leaves in the memory pool every scratch block the forward takes, so the
    /// capture itself allocates nothing and copies nothing. Those scratch
    /// blocks then belong to the graph until it is dropped. Other threads'
    /// work on the backend's stream waits while the capture records.
    pub fn capture(&self, batch: usize, n_in: usize) -> Result<ProjectorGraph<'_>> {
        let be = self.backend();
        let mut plan = self.plan(batch, n_in)?;
        let mut input = be.alloc(&[batch, n_in, self.config().in_dim])?;
        be.zero(&mut input)?;
        self.forward_with(&mut plan, &input, None)?;
        be.synchronize()?;
        let ((), graph) = be.capture(|| self.forward_with(&mut plan, &input, None).map(|_| ()))?;
        Ok(ProjectorGraph {
            graph,
            projector: self,
            plan,
            input_ptr: input.device_ptr(),
            input,
        })
    }
}

impl ProjectorGraph<'_> {
    /// Copies `hidden` (`[batch, n_in, in_dim]` on this backend) into the
    /// graph's input and queues a replay; returns the output buffer, valid
    /// once the stream reaches it (a download waits for it).
    pub fn forward(&mut self, hidden: &CudaTensor) -> Result<&CudaTensor> {
        if hidden.shape() != self.input.shape() {
            return Err(Error::Shape {
                key: "hidden".into(),
                expected: self.input.shape().to_vec(),
                found: hidden.shape().to_vec(),
            });
        }
        self.projector
            .backend()
            .copy_device(hidden, &mut self.input)?;
        self.replay()?;
        Ok(self.plan.output())
    }

    /// Queues a replay on the backend's stream: the forward of whatever the
    /// input buffer holds then (write it with your own kernels or copies on
    /// the same stream, or use [`forward`](Self::forward)).
    pub fn replay(&self) -> Result<()> {
        if self.input.device_ptr() != self.input_ptr {
            return Err(Error::invalid(
                "the graph's input tensor was replaced: the graph reads the buffer it was \
                 captured with; write into input_mut() instead of assigning to it",
            ));
        }
        self.backend().replay(&self.graph)
    }

    /// The graph's input, `[batch, n_in, in_dim]`.
    pub fn input(&self) -> &CudaTensor {
        &self.input
    }

    /// The input, to be written by your own work on the backend's stream
    /// (as an op's output, or through its address). Replacing the tensor
    /// itself makes [`replay`](Self::replay) an error.
    pub fn input_mut(&mut self) -> &mut CudaTensor {
        &mut self.input
    }

    /// The conditioning `[batch, n_out, out_dim]` of the last replay.
    pub fn output(&self) -> &CudaTensor {
        self.plan.output()
    }

    /// Kernels one replay runs.
    pub fn kernels(&self) -> u64 {
        self.graph.kernels()
    }

    /// The batch size the graph was captured for; every replay runs exactly this many rows.
    pub fn batch(&self) -> usize {
        self.plan.batch()
    }

    fn backend(&self) -> &Cuda {
        self.projector.backend()
    }
}
