//! Block streaming: transformer blocks kept in host memory and uploaded to the device one by one
//! while the previous block computes, so a model larger than the GPU's free memory runs with the
//! same arithmetic as the resident one (the kernels see identical bytes: output is bit-identical).
//!
//! On CUDA each streamed block's tensors live in one page-locked host buffer; uploads go through a
//! dedicated copy stream (host→device DMA overlaps the compute stream's kernels) and an event per
//! block makes the compute stream wait for exactly that block. Device memory of a block is released
//! only after the compute stream has passed it (cudarc's per-allocation events order the free on
//! the copy stream behind the kernels that read it). On the CPU "upload" is a copy, which exercises
//! the same code path. Quantised weights (FP8, GGUF blocks as U8) travel as their stored bytes and
//! are dequantised on the device when their block runs; the upload never converts anything.

use std::collections::{HashMap, VecDeque};

use anyhow::Result;
use candle_core::{Device, Tensor};

/// How a streamed transformer keeps its blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamOptions {
    /// The first `resident_blocks` blocks stay on the device for the whole run.
    pub resident_blocks: usize,
    /// Blocks uploaded ahead of the one computing (≥ 1 to overlap copies with compute).
    pub prefetch: usize,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            resident_blocks: 0,
            prefetch: 1,
        }
    }
}

/// One block's tensors in host memory, ready to upload.
pub(crate) struct HostBlock {
    bytes: usize,
    data: HostData,
}

enum HostData {
    Tensors(Vec<(String, Tensor)>),
    #[cfg(feature = "cuda")]
    Pinned(gpu::PinnedBlock),
}

impl HostBlock {
    /// Bytes of the block's weights.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Uploads [`HostBlock`]s to `device` (a copy stream on CUDA).
pub(crate) struct Uploader {
    device: Device,
    #[cfg(feature = "cuda")]
    copy: Option<gpu::CopyStream>,
}

/// A block's device tensors plus the point the compute stream must wait for before using them.
pub(crate) struct InFlight {
    pub tensors: HashMap<String, Tensor>,
    #[cfg(feature = "cuda")]
    ready: Option<gpu::Ready>,
}

impl Uploader {
    pub fn new(device: &Device) -> Result<Self> {
        Ok(Self {
            device: device.clone(),
            #[cfg(feature = "cuda")]
            copy: match device {
                Device::Cuda(d) => Some(gpu::CopyStream::new(d)?),
                _ => None,
            },
        })
    }

    /// Moves a block's tensors into upload-ready host memory (page-locked on CUDA, where the
    /// pinned buffer becomes the only host copy: no second copy of a 28 GB expert).
    pub fn stage(&self, tensors: Vec<(String, Tensor)>) -> Result<HostBlock> {
        let tensors = tensors
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?.contiguous()?)))
            .collect::<Result<Vec<_>>>()?;
        let bytes = tensors
            .iter()
            .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        #[cfg(feature = "cuda")]
        if let Some(copy) = &self.copy {
            return Ok(HostBlock {
                bytes,
                data: HostData::Pinned(copy.pin(&tensors)?),
            });
        }
        Ok(HostBlock {
            bytes,
            data: HostData::Tensors(tensors),
        })
    }

    /// Issues the block's upload; returns at once on CUDA (the copy runs on the copy stream).
    #[allow(clippy::infallible_destructuring_match)] // a second variant exists with `cuda`
    pub fn upload(&self, block: &HostBlock) -> Result<InFlight> {
        let tensors = match &block.data {
            #[cfg(feature = "cuda")]
            HostData::Pinned(pinned) => {
                let copy = self
                    .copy
                    .as_ref()
                    .ok_or_else(|| anyhow::anyhow!("pinned block without a copy stream"))?;
                let (tensors, ready) = copy.upload(pinned)?;
                return Ok(InFlight {
                    tensors,
                    ready: Some(ready),
                });
            }
            HostData::Tensors(tensors) => tensors,
        };
        let tensors = tensors
            .iter()
            .map(|(n, t)| {
                // A real copy on the CPU too, so that the streamed path never aliases host data.
                let t = if self.device.is_cpu() {
                    t.copy()?
                } else {
                    t.to_device(&self.device)?
                };
                Ok((n.clone(), t))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(InFlight {
            tensors,
            #[cfg(feature = "cuda")]
            ready: None,
        })
    }

    /// Makes the copy stream (where streamed blocks are freed) wait for all work queued on the
    /// compute stream so far: a block dropped after this is freed only once its kernels ran.
    pub fn release_after_compute(&self) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(copy) = &self.copy {
            copy.copy_waits_for_compute()?;
        }
        Ok(())
    }

    /// Makes the compute stream wait until `block`'s upload has landed.
    pub fn wait_for(&self, block: &InFlight) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let (Some(copy), Some(ready)) = (&self.copy, &block.ready) {
            copy.compute_waits(ready)?;
        }
        let _ = block;
        Ok(())
    }
}

/// Runs `f` over every block index in order, handing it the device tensors of that block:
/// resident ones directly, streamed ones uploaded `prefetch` blocks ahead.
pub(crate) fn for_each_streamed(
    uploader: &Uploader,
    host: &[HostBlock],
    first_index: usize,
    prefetch: usize,
    mut f: impl FnMut(usize, HashMap<String, Tensor>) -> Result<()>,
) -> Result<()> {
    let mut queue: VecDeque<(usize, InFlight)> = VecDeque::new();
    let mut next = 0;
    while next < host.len() || !queue.is_empty() {
        while next < host.len() && queue.len() <= prefetch {
            queue.push_back((next, uploader.upload(&host[next])?));
            next += 1;
        }
        let (i, block) = queue.pop_front().expect("queue refilled above");
        uploader.wait_for(&block)?;
        // The block's memory is freed on the copy stream. Kernels that take raw addresses (FP8
        // dequantisation, our fused kernels) record no read of it, so hold the block until the
        // copy stream has been told to wait for everything the compute stream has queued.
        let held: Vec<Tensor> = block.tensors.values().cloned().collect();
        f(first_index + i, block.tensors)?;
        uploader.release_after_compute()?;
        drop(held);
    }
    Ok(())
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::collections::HashMap;
    use std::sync::Arc;

    use anyhow::{bail, Result};
    use candle_core::cuda::cudarc::driver::{CudaEvent, CudaStream, PinnedHostSlice};
    use candle_core::cuda::CudaStorage;
    use candle_core::op::BackpropOp;
    use candle_core::{CudaDevice, DType, Shape, Storage, Tensor};

    /// Alignment of each tensor inside a pinned block (16 B: any element type, vector loads).
    const ALIGN: usize = 256;

    pub struct Entry {
        name: String,
        dtype: DType,
        shape: Shape,
        offset: usize,
        bytes: usize,
    }

    pub struct PinnedBlock {
        buffer: PinnedHostSlice<u8>,
        entries: Vec<Entry>,
    }

    pub struct Ready(CudaEvent);

    pub struct CopyStream {
        device: CudaDevice,
        stream: Arc<CudaStream>,
    }

    /// Copies a contiguous CPU tensor's raw bytes into `dst` (no intermediate buffers: a 28 GB
    /// expert is staged with one copy).
    fn write_bytes(t: &Tensor, dst: &mut [u8]) -> Result<()> {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            bail!("block streaming: staging expects host tensors");
        };
        let (start, n) = (layout.start_offset(), t.elem_count());
        fn raw<T>(v: &[T]) -> &[u8] {
            // SAFETY: plain-old-data element types viewed as bytes.
            unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
        }
        let src = match t.dtype() {
            DType::F32 => raw(&cpu.as_slice::<f32>()?[start..start + n]),
            DType::BF16 => raw(&cpu.as_slice::<half::bf16>()?[start..start + n]),
            DType::F16 => raw(&cpu.as_slice::<half::f16>()?[start..start + n]),
            DType::U8 => raw(&cpu.as_slice::<u8>()?[start..start + n]),
            DType::F8E4M3 => raw(&cpu.as_slice::<float8::F8E4M3>()?[start..start + n]),
            other => bail!("block streaming: weights of dtype {other:?} are not supported"),
        };
        dst.copy_from_slice(src);
        Ok(())
    }

    impl CopyStream {
        pub fn new(device: &CudaDevice) -> Result<Self> {
            let stream = device.cuda_stream().context().new_stream()?;
            Ok(Self {
                device: device.clone(),
                stream,
            })
        }

        pub fn pin(&self, tensors: &[(String, Tensor)]) -> Result<PinnedBlock> {
            let mut entries = Vec::with_capacity(tensors.len());
            let mut offset = 0;
            for (name, t) in tensors {
                let bytes = t.elem_count() * t.dtype().size_in_bytes();
                entries.push(Entry {
                    name: name.clone(),
                    dtype: t.dtype(),
                    shape: t.shape().clone(),
                    offset,
                    bytes,
                });
                offset += bytes.div_ceil(ALIGN) * ALIGN;
            }
            let ctx = self.device.cuda_stream().context().clone();
            // SAFETY: every byte that is later read is written below first.
            let mut buffer = unsafe { ctx.alloc_pinned::<u8>(offset.max(1))? };
            let host = buffer.as_mut_slice()?;
            for ((_, t), e) in tensors.iter().zip(&entries) {
                write_bytes(t, &mut host[e.offset..e.offset + e.bytes])?;
            }
            Ok(PinnedBlock { buffer, entries })
        }

        pub fn upload(&self, block: &PinnedBlock) -> Result<(HashMap<String, Tensor>, Ready)> {
            let host = block.buffer.as_slice()?;
            let mut out = HashMap::with_capacity(block.entries.len());
            for e in &block.entries {
                let src = &host[e.offset..e.offset + e.bytes];
                let storage = match e.dtype {
                    DType::F32 => self.copy_typed::<f32>(src)?,
                    DType::BF16 => self.copy_typed::<half::bf16>(src)?,
                    DType::F16 => self.copy_typed::<half::f16>(src)?,
                    DType::U8 => self.copy_typed::<u8>(src)?,
                    DType::F8E4M3 => self.copy_typed::<float8::F8E4M3>(src)?,
                    other => bail!("block streaming: dtype {other:?} is not supported"),
                };
                let t = Tensor::from_storage(
                    Storage::Cuda(storage),
                    e.shape.clone(),
                    BackpropOp::none(),
                    false,
                );
                out.insert(e.name.clone(), t);
            }
            Ok((out, Ready(self.stream.record_event(None)?)))
        }

        fn copy_typed<T>(&self, src: &[u8]) -> Result<CudaStorage>
        where
            T: candle_core::cuda::cudarc::driver::DeviceRepr + candle_core::cuda::CudaDType,
        {
            let n = src.len() / std::mem::size_of::<T>();
            // SAFETY: `src` comes from an ALIGN-aligned offset of a page-aligned pinned buffer
            // and holds `n` values of T written by `pin`.
            let typed = unsafe { std::slice::from_raw_parts(src.as_ptr() as *const T, n) };
            // SAFETY: fully overwritten by the copy below before any use.
            let mut dst = unsafe { self.stream.alloc::<T>(n)? };
            self.stream.memcpy_htod(typed, &mut dst)?;
            Ok(CudaStorage::wrap_cuda_slice(dst, self.device.clone()))
        }

        pub fn copy_waits_for_compute(&self) -> Result<()> {
            let done = self.device.cuda_stream().record_event(None)?;
            self.stream.wait(&done)?;
            Ok(())
        }

        pub fn compute_waits(&self, ready: &Ready) -> Result<()> {
            self.device.cuda_stream().wait(&ready.0)?;
            Ok(())
        }
    }
}
