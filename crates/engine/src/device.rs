//! Device and dtype selection from user-facing names.

use anyhow::Result;
use candle_core::{DType, Device};

use crate::invalid;

/// The device a run uses when none is named: the GPU in a build with the `cuda` feature, else
/// the CPU (the CLI, its workers and the server's request checks all follow this one rule).
pub fn default_device() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda"
    } else {
        "cpu"
    }
}

/// `cpu` or `cuda` (GPU 0) / `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        n if n == "cuda" || n.starts_with("cuda:") => {
            let ordinal = match n.strip_prefix("cuda:") {
                Some(i) => i
                    .parse::<usize>()
                    .map_err(|_| invalid!("--device: `{n}` is not cuda or cuda:N"))?,
                None => 0,
            };
            cuda_device(ordinal)
        }
        other => Err(invalid!(
            "--device: `{other}` is not one of cpu, cuda, cuda:N"
        )),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    // f32 means f32: cuDNN (and cuBLAS) would otherwise run f32 convolutions in TF32 (10-bit
    // mantissa), 1e-3 relative error on the VAE. Read by the libraries when their handles are
    // created, so set before any GPU work; a value the user set wins.
    if std::env::var_os("NVIDIA_TF32_OVERRIDE").is_none() {
        std::env::set_var("NVIDIA_TF32_OVERRIDE", "0");
    }
    let device = Device::new_cuda(ordinal)?;
    gpu_memory::retain_freed_memory(&device)?;
    Ok(device)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> Result<Device> {
    Err(invalid!(
        "--device cuda: this vidgen was built without CUDA; rebuild with `cargo build --release --features cuda`"
    ))
}

/// `f32`, `bf16` (and `f16`).
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(invalid!("--dtype: `{other}` is not one of f32, bf16, f16")),
    }
}

/// GPU memory accounting. candle allocates through cudarc with `cuMemAllocAsync`, i.e. from the
/// device's default stream-ordered memory pool, so the pool's own counters are exact: the bytes in
/// use now and their high-water mark since the last reset (the bench and `--report-memory` read
/// these; polling free memory would miss short peaks).
pub mod gpu_memory {
    use anyhow::Result;
    use candle_core::Device;

    /// Bytes in use by this process's allocations on `device` and the peak since the last
    /// [`reset_peak`]; `None` on the CPU.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct PoolUsage {
        pub used: u64,
        pub peak: u64,
        /// Held by the pool from the driver: `used` plus freed blocks kept for reuse.
        pub reserved: u64,
    }

    /// Free and total device memory as the driver reports them (all processes); `None` on the CPU.
    pub fn free_and_total(device: &Device) -> Result<Option<(u64, u64)>> {
        imp::free_and_total(device)
    }

    pub fn usage(device: &Device) -> Result<Option<PoolUsage>> {
        imp::usage(device)
    }

    pub fn reset_peak(device: &Device) -> Result<()> {
        imp::reset_peak(device)
    }

    /// Keeps freed blocks in the pool instead of returning them to the driver at every
    /// synchronisation (the default threshold 0 makes each forward re-map its activations).
    pub fn retain_freed_memory(device: &Device) -> Result<()> {
        imp::retain_freed_memory(device)
    }

    #[cfg(feature = "cuda")]
    mod imp {
        use super::PoolUsage;
        use anyhow::{bail, Result};
        use candle_core::cuda::cudarc::driver::sys;
        use candle_core::Device;

        fn check(code: sys::CUresult, what: &str) -> Result<()> {
            if code != sys::CUresult::CUDA_SUCCESS {
                bail!("{what} failed: {code:?}");
            }
            Ok(())
        }

        fn pool(device: &Device) -> Result<Option<sys::CUmemoryPool>> {
            let Device::Cuda(dev) = device else {
                return Ok(None);
            };
            let ctx = dev.cuda_stream().context().clone();
            ctx.bind_to_thread()?;
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            // SAFETY: plain driver query on a valid device handle; `pool` is an out-parameter.
            check(
                unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) },
                "cuDeviceGetDefaultMemPool",
            )?;
            Ok(Some(pool))
        }

        fn get(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute) -> Result<u64> {
            let mut value: u64 = 0;
            // SAFETY: these attributes are documented as cuuint64_t.
            check(
                unsafe { sys::cuMemPoolGetAttribute(pool, attr, &mut value as *mut u64 as *mut _) },
                "cuMemPoolGetAttribute",
            )?;
            Ok(value)
        }

        fn set(
            pool: sys::CUmemoryPool,
            attr: sys::CUmemPool_attribute,
            mut value: u64,
        ) -> Result<()> {
            // SAFETY: as above; the driver copies the value.
            check(
                unsafe { sys::cuMemPoolSetAttribute(pool, attr, &mut value as *mut u64 as *mut _) },
                "cuMemPoolSetAttribute",
            )
        }

        pub fn free_and_total(device: &Device) -> Result<Option<(u64, u64)>> {
            let Device::Cuda(dev) = device else {
                return Ok(None);
            };
            let (free, total) = dev.cuda_stream().context().mem_get_info()?;
            Ok(Some((free as u64, total as u64)))
        }

        pub fn usage(device: &Device) -> Result<Option<PoolUsage>> {
            let Some(pool) = pool(device)? else {
                return Ok(None);
            };
            use sys::CUmemPool_attribute::*;
            Ok(Some(PoolUsage {
                used: get(pool, CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
                peak: get(pool, CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
                reserved: get(pool, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
            }))
        }

        pub fn reset_peak(device: &Device) -> Result<()> {
            if let Some(pool) = pool(device)? {
                device.synchronize()?;
                set(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    0,
                )?;
            }
            Ok(())
        }

        pub fn retain_freed_memory(device: &Device) -> Result<()> {
            if let Some(pool) = pool(device)? {
                set(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    u64::MAX,
                )?;
            }
            Ok(())
        }
    }

    #[cfg(not(feature = "cuda"))]
    mod imp {
        use super::PoolUsage;
        use anyhow::Result;
        use candle_core::Device;

        pub fn free_and_total(_device: &Device) -> Result<Option<(u64, u64)>> {
            Ok(None)
        }
        pub fn usage(_device: &Device) -> Result<Option<PoolUsage>> {
            Ok(None)
        }
        pub fn reset_peak(_device: &Device) -> Result<()> {
            Ok(())
        }
        pub fn retain_freed_memory(_device: &Device) -> Result<()> {
            Ok(())
        }
    }
}
