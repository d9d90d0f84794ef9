//! Raw device-memory plumbing shared by the Rust sides of our CUDA kernels (`kernels/*.cu`): the
//! DiT's fused ops, the fused attention and the VAE ops. Every launch goes to candle's stream, so
//! ordering needs no events; callers keep the tensors alive across their launches.

use anyhow::{bail, Result};
use candle_core::cuda::cudarc::driver::{DevicePtr, DriverError};
use candle_core::cuda::{CudaStorage, CudaStorageSlice};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, DType, Layout, Storage, Tensor};

/// The kernel-name suffix of a dtype (`f32`, `bf16`, `f16`).
pub fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => bail!("CUDA kernels: dtype {other:?} is not f32, bf16 or f16"),
    })
}

pub fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    Ok(t.device().as_cuda_device()?.clone())
}

/// Device address of a tensor's first element (f32, bf16, f16 or f8e4m3).
pub fn address(t: &Tensor) -> Result<u64> {
    let (storage, layout): (_, &Layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        bail!("CUDA kernels: tensor is not on a CUDA device");
    };
    let stream = s.device.cuda_stream();
    let offset = layout.start_offset() as u64;
    let (base, size) = match &s.slice {
        CudaStorageSlice::F32(v) => (v.device_ptr(&stream).0, 4),
        CudaStorageSlice::BF16(v) => (v.device_ptr(&stream).0, 2),
        CudaStorageSlice::F16(v) => (v.device_ptr(&stream).0, 2),
        CudaStorageSlice::F8E4M3(v) => (v.device_ptr(&stream).0, 1),
        _ => bail!("CUDA kernels: dtype {:?} is not supported", t.dtype()),
    };
    Ok(base + offset * size)
}

/// A fresh contiguous tensor and its address, uninitialised: the caller's kernel writes every
/// element before anything reads it.
pub fn alloc(dev: &CudaDevice, dtype: DType, dims: &[usize]) -> Result<(Tensor, u64)> {
    let n: usize = dims.iter().product();
    // SAFETY: see above — every element is written by the launching kernel.
    let storage = unsafe {
        match dtype {
            DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc::<f32>(n)?, dev.clone()),
            DType::BF16 => CudaStorage::wrap_cuda_slice(dev.alloc::<half::bf16>(n)?, dev.clone()),
            DType::F16 => CudaStorage::wrap_cuda_slice(dev.alloc::<half::f16>(n)?, dev.clone()),
            DType::F8E4M3 => {
                CudaStorage::wrap_cuda_slice(dev.alloc::<float8::F8E4M3>(n)?, dev.clone())
            }
            other => bail!("CUDA kernels: dtype {other:?} is not f32, bf16, f16 or f8e4m3"),
        }
    };
    let t = Tensor::from_storage(Storage::Cuda(storage), dims, BackpropOp::none(), false);
    let p = address(&t)?;
    Ok((t, p))
}

/// The device's compute capability, (major, minor): e.g. (9, 0) for Hopper.
pub fn compute_capability(dev: &CudaDevice) -> Result<(i32, i32)> {
    use candle_core::cuda::cudarc::driver::sys::CUdevice_attribute as A;
    let ctx = dev.cuda_stream().context().clone();
    Ok((
        ctx.attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .map_err(candle_core::Error::wrap)?,
        ctx.attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
            .map_err(candle_core::Error::wrap)?,
    ))
}

/// A launch result as an error that names the driver's code.
pub fn launched(r: std::result::Result<(), DriverError>) -> Result<()> {
    r.map_err(candle_core::Error::wrap)?;
    Ok(())
}

/// A cuDNN handle bound to one of candle's streams, with a scratch workspace that grows as needed
/// (shared by the VAE convolutions and the fused attention, each keeping one per thread and device).
pub struct CudnnHandle {
    pub handle: candle_core::cuda::cudarc::cudnn::sys::cudnnHandle_t,
    workspace: Option<candle_core::cuda::cudarc::driver::CudaSlice<u8>>,
}

impl Drop for CudnnHandle {
    fn drop(&mut self) {
        // SAFETY: created in `CudnnHandle::new` and destroyed once, here.
        let _ = unsafe { candle_core::cuda::cudarc::cudnn::result::destroy_handle(self.handle) };
    }
}

impl CudnnHandle {
    pub fn new(
        stream: &std::sync::Arc<candle_core::cuda::cudarc::driver::CudaStream>,
    ) -> Result<Self> {
        use candle_core::cuda::cudarc::cudnn::result as cudnn;
        stream
            .context()
            .bind_to_thread()
            .map_err(candle_core::Error::wrap)?;
        let handle = cudnn::create_handle()?;
        // SAFETY: a fresh handle and candle's live stream.
        unsafe { cudnn::set_stream(handle, stream.cu_stream() as *mut _) }?;
        Ok(Self {
            handle,
            workspace: None,
        })
    }

    /// The workspace's address, grown to at least `bytes` (0 when none is needed).
    pub fn workspace(
        &mut self,
        stream: &std::sync::Arc<candle_core::cuda::cudarc::driver::CudaStream>,
        bytes: usize,
    ) -> Result<u64> {
        use candle_core::cuda::cudarc::driver::DevicePtrMut;
        if bytes == 0 {
            return Ok(0);
        }
        if self.workspace.as_ref().is_none_or(|w| w.len() < bytes) {
            // Freed in stream order, after any work still using it.
            self.workspace = None;
            // SAFETY: scratch memory; cuDNN needs no initial contents.
            self.workspace =
                Some(unsafe { stream.alloc::<u8>(bytes) }.map_err(candle_core::Error::wrap)?);
        }
        let ws = self.workspace.as_mut().expect("allocated above");
        Ok(ws.device_ptr_mut(stream).0)
    }
}
