//! One CUDA device: context, stream, and the NVRTC-compiled modules of [`KernelFile`], cached per device.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

use crate::error::{Error, Result};

/// Helpers prepended to every kernel file (headerless: bf16 as raw `u16`, PTX inline).
const COMMON: &str = include_str!("../../../kernels/common.cuh");
/// Hopper warpgroup-MMA helpers, active only for sm_90a targets (`__CUDA_ARCH_FEAT_SM90_ALL`).
const WGMMA: &str = include_str!("../../../kernels/wgmma.cuh");

/// Environment variable overriding the NVRTC target (default `compute_90a`: Hopper with wgmma;
/// `compute_90` drops the wgmma kernels and the mma.sync ones are used).
pub const ARCH_ENV: &str = "ATTNPLAN_NVRTC_ARCH";

/// Environment variable that, set to `1`, compiles the kernels with `-lineinfo` (source lines for
/// Nsight Compute's source view; the code is the same).
pub const LINEINFO_ENV: &str = "ATTNPLAN_NVRTC_LINEINFO";

/// Environment variable overriding `exp2_emu` of attention.cu for both head dims (one in N of the
/// softmax's column pairs takes its exponentials on the FMA pipe, 0: none; unset: 4 at head_dim 64,
/// 0 at 128), for comparing variants on the device.
pub const EXP2_EMU_ENV: &str = "ATTNPLAN_EXP2_EMU";

/// Environment variable overriding how attention.cu's softmax keeps its row sums, for both head dims
/// (`0`: the f32 P; `1`: P as rounded to bf16, the values P·V multiplies; `2`: summed by the P·V MMA
/// against a tile of ones in the warp-specialized kernels, else as `1`; unset: 2 at head_dim 64, 0 at
/// 128), for comparing variants on the device.
pub const ROUNDED_SUMS_ENV: &str = "ATTNPLAN_ROUNDED_SUMS";

/// Environment variable that, set to `0`, queues every index builder of a plan layer on the main
/// stream instead of giving the block-sparse and token-select builders their own
/// (the device's aux streams), for comparing the two on the device.
pub const INDEX_STREAMS_ENV: &str = "ATTNPLAN_INDEX_STREAMS";

/// The `.cu` files of `runtime/kernels/`, embedded at build time, compiled at first use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelFile {
    /// `attention.cu`: `attn_fwd_d64`, `attn_fwd_d128` (mma.sync), `attn_fwd_wg_d64`, `attn_fwd_wg_d128`
    /// (wgmma, sm_90a only).
    Attention,
    /// `vertical_slash.cu`: `vs_est_*`, `vs_est_reduce`, `vs_topk`, `vs_count`, `vs_scan`, `vs_fill`.
    VerticalSlash,
    /// `block_sparse.cu`: `bs_pool_d*`, `bs_score_d*`, `bs_select`, `bs_fill`.
    BlockSparse,
    /// `token_select.cu`: `ts_keep`, `ts_select`, `ts_scan`, `ts_count`, `ts_fill`.
    TokenSelect,
    /// `query_adaptive.cu`: `qa_div_d*`, `qa_budgets`.
    QueryAdaptive,
}

impl KernelFile {
    pub const ALL: [KernelFile; 5] = [
        KernelFile::Attention,
        KernelFile::VerticalSlash,
        KernelFile::BlockSparse,
        KernelFile::TokenSelect,
        KernelFile::QueryAdaptive,
    ];

    pub fn file_name(self) -> &'static str {
        match self {
            KernelFile::Attention => "attention.cu",
            KernelFile::VerticalSlash => "vertical_slash.cu",
            KernelFile::BlockSparse => "block_sparse.cu",
            KernelFile::TokenSelect => "token_select.cu",
            KernelFile::QueryAdaptive => "query_adaptive.cu",
        }
    }

    fn body(self) -> &'static str {
        match self {
            KernelFile::Attention => include_str!("../../../kernels/attention.cu"),
            KernelFile::VerticalSlash => include_str!("../../../kernels/vertical_slash.cu"),
            KernelFile::BlockSparse => include_str!("../../../kernels/block_sparse.cu"),
            KernelFile::TokenSelect => include_str!("../../../kernels/token_select.cu"),
            KernelFile::QueryAdaptive => include_str!("../../../kernels/query_adaptive.cu"),
        }
    }
}

/// Compiles `file` with NVRTC for `arch` (e.g. `compute_90`); needs libnvrtc, not a device.
pub fn compile(file: KernelFile, arch: &'static str) -> Result<Ptx> {
    // SAFETY: only probes whether the shared library can be opened.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::CudaUnavailable(
            "no NVRTC: libnvrtc could not be loaded".into(),
        ));
    }
    let src = format!("{COMMON}\n{WGMMA}\n{}", file.body());
    let mut options = vec!["-std=c++17".to_owned()];
    if std::env::var(LINEINFO_ENV).is_ok_and(|v| v == "1") {
        options.push("-lineinfo".to_owned());
    }
    if let Ok(v) = std::env::var(EXP2_EMU_ENV) {
        let n: u8 = v
            .parse()
            .map_err(|_| Error::CudaUnsupported(format!("{EXP2_EMU_ENV}={v}: expected 0 to 8")))?;
        if n > 8 {
            return Err(Error::CudaUnsupported(format!(
                "{EXP2_EMU_ENV}={v}: expected 0 to 8"
            )));
        }
        options.push(format!("-DEXP2_EMU_D64={n}"));
        options.push(format!("-DEXP2_EMU_D128={n}"));
    }
    if let Ok(v) = std::env::var(ROUNDED_SUMS_ENV) {
        let on = match v.as_str() {
            "0" | "1" | "2" => v.as_str(),
            _ => {
                return Err(Error::CudaUnsupported(format!(
                    "{ROUNDED_SUMS_ENV}={v}: expected 0, 1 or 2"
                )))
            }
        };
        options.push(format!("-DROUNDED_SUMS_D64={on}"));
        options.push(format!("-DROUNDED_SUMS_D128={on}"));
    }
    let opts = CompileOptions {
        arch: Some(arch),
        options,
        name: Some(file.file_name().into()),
        ..Default::default()
    };
    compile_ptx_with_opts(src, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => Error::CudaCompile {
            file: file.file_name(),
            log: log.to_string_lossy().into_owned(),
        },
        other => Error::CudaCompile {
            file: file.file_name(),
            log: format!("{other:?}"),
        },
    })
}

/// Maps a driver error into the crate's error, naming what was being done.
pub(crate) fn drv<T>(
    what: &str,
    r: std::result::Result<T, cudarc::driver::DriverError>,
) -> Result<T> {
    r.map_err(|e| Error::Cuda(format!("{what}: {e:?}")))
}

/// A CUDA device with its streams and a module cache.
///
/// Everything is queued on `stream` except a plan layer's independent index builders, which run on
/// the `aux` streams: a builder queues its work on an aux stream only after making it wait for
/// `stream` (`follow`), and the layer makes `stream` wait for the aux streams before it reads or
/// merges their lists. Buffers are allocated and freed on `stream` only, before such a fork.
#[derive(Debug)]
pub struct Device {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    /// Two streams for the block-sparse and token-select builders of a plan layer (both `stream`
    /// itself with [`INDEX_STREAMS_ENV`]`=0`).
    pub(crate) aux: [Arc<CudaStream>; 2],
    /// One event per stream (`stream`, then `aux`), re-recorded by each `follow` of it: a
    /// wait takes the event's state when it is queued, so one event serves every fork and join.
    marks: Mutex<[CudaEvent; 3]>,
    modules: Mutex<HashMap<KernelFile, Arc<CudaModule>>>,
    arch: &'static str,
}

impl Device {
    /// Opens device `ordinal`. Fails with [`Error::CudaUnavailable`] when libcuda or libnvrtc cannot be
    /// loaded or no device exists.
    pub fn new(ordinal: usize) -> Result<Self> {
        // SAFETY: only probes whether the shared libraries can be opened.
        let (cu, rtc) = unsafe {
            (
                cudarc::driver::sys::is_culib_present(),
                cudarc::nvrtc::sys::is_culib_present(),
            )
        };
        if !cu {
            return Err(Error::CudaUnavailable(
                "no CUDA driver: libcuda could not be loaded".into(),
            ));
        }
        if !rtc {
            return Err(Error::CudaUnavailable(
                "no NVRTC: libnvrtc could not be loaded".into(),
            ));
        }
        let count = drv("cuDeviceGetCount", CudaContext::device_count())?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::CudaUnavailable(format!(
                "device {ordinal} requested, {count} present"
            )));
        }
        let ctx = drv("cuCtx", CudaContext::new(ordinal))?;
        // Per-buffer event tracking only adds launch overhead: the order between streams is kept
        // by hand (see the type's docs).
        // SAFETY: buffers are allocated and freed on `stream`; work on the aux streams is queued
        // after a `follow` of `stream` and joined back into it before its results are read.
        unsafe { ctx.disable_event_tracking() };
        let stream = drv("cuStreamCreate", ctx.new_stream())?;
        let aux = match std::env::var(INDEX_STREAMS_ENV).as_deref() {
            Ok("0") => [stream.clone(), stream.clone()],
            _ => [
                drv("cuStreamCreate", ctx.new_stream())?,
                drv("cuStreamCreate", ctx.new_stream())?,
            ],
        };
        let mark = || {
            let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING);
            drv("cuEventCreate", ctx.new_event(flags))
        };
        let marks = Mutex::new([mark()?, mark()?, mark()?]);
        let arch = match std::env::var(ARCH_ENV).as_deref() {
            Ok("sm_90a") => "sm_90a",
            Ok("sm_90") => "sm_90",
            Ok("compute_90") => "compute_90",
            _ => "compute_90a",
        };
        Ok(Self {
            ctx,
            stream,
            aux,
            marks,
            modules: Mutex::new(HashMap::new()),
            arch,
        })
    }

    /// The device's name and compute capability.
    pub fn describe(&self) -> Result<String> {
        let name = drv("cuDeviceGetName", self.ctx.name())?;
        let (ma, mi) = drv("compute capability", self.ctx.compute_capability())?;
        Ok(format!("{name} (sm_{ma}{mi})"))
    }

    /// The module of `file`, compiling it with NVRTC at first use.
    pub fn module(&self, file: KernelFile) -> Result<Arc<CudaModule>> {
        let mut cache = self
            .modules
            .lock()
            .map_err(|_| Error::Cuda("module cache lock poisoned".into()))?;
        if let Some(m) = cache.get(&file) {
            return Ok(m.clone());
        }
        let ptx = compile(file, self.arch)?;
        let module = drv("cuModuleLoadData", self.ctx.load_module(ptx))?;
        cache.insert(file, module.clone());
        Ok(module)
    }

    /// Function `name` of `file`; `dyn_smem` bytes of dynamic shared memory are allowed when above 48 KB.
    pub fn function(&self, file: KernelFile, name: &str, dyn_smem: u32) -> Result<CudaFunction> {
        let f = drv(name, self.module(file)?.load_function(name))?;
        if dyn_smem > 48 * 1024 {
            drv(
                "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)",
                f.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    dyn_smem as i32,
                ),
            )?;
        }
        Ok(f)
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        drv("cuStreamSynchronize", self.stream.synchronize())
    }
}

/// Makes `s` wait for the work queued on `other` so far (nothing when they are the same stream);
/// `other` is the device's main stream or one of its aux streams.
pub(crate) fn follow(dev: &Device, s: &CudaStream, other: &CudaStream) -> Result<()> {
    if s.cu_stream() == other.cu_stream() {
        return Ok(());
    }
    let which = std::iter::once(&dev.stream)
        .chain(&dev.aux)
        .position(|x| x.cu_stream() == other.cu_stream())
        .ok_or_else(|| Error::Cuda("follow: not one of the device's streams".into()))?;
    let marks = dev
        .marks
        .lock()
        .map_err(|_| Error::Cuda("stream events lock poisoned".into()))?;
    drv("cuEventRecord", marks[which].record(other))?;
    drv("cuStreamWaitEvent", s.wait(&marks[which]))
}

#[cfg(test)]
mod tests {
    use super::{KernelFile, COMMON};

    /// The value of the first `#define name value` line of `src`, as a number (decimal or hex,
    /// with an optional `u` suffix).
    fn define(src: &str, name: &str) -> Option<u64> {
        let v = src.lines().find_map(|l| {
            let mut t = l.split_whitespace();
            (t.next() == Some("#define") && t.next() == Some(name))
                .then(|| t.next())
                .flatten()
        })?;
        let v = v.trim_end_matches('u');
        match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => v.parse().ok(),
        }
    }

    /// Launch shapes and markers the host mirrors from the kernels' `#define`s: a change on one
    /// side only fails here instead of on the device.
    #[test]
    fn host_constants_match_the_kernels_defines() {
        use super::super::{block_sparse as bs, plan, query_adaptive as qa, vertical_slash as vs};
        let cases: [(&str, &str, u64); 8] = [
            (COMMON, "FILL_THREADS", super::super::FILL_THREADS.into()),
            (
                KernelFile::Attention.body(),
                "SCHED_COLUMN",
                super::super::SCHED_COLUMN.into(),
            ),
            (
                KernelFile::VerticalSlash.body(),
                "TK_CLUSTER",
                vs::TOPK_CLUSTER.into(),
            ),
            (
                KernelFile::VerticalSlash.body(),
                "MC_RUN",
                plan::MERGE_COPY_RUN as u64,
            ),
            (
                KernelFile::QueryAdaptive.body(),
                "QA_CLUSTER",
                qa::BUDGET_CLUSTER.into(),
            ),
            (
                KernelFile::BlockSparse.body(),
                "BS_THREADS",
                bs::THREADS.into(),
            ),
            (KernelFile::BlockSparse.body(), "BS_SKIP", bs::SKIP.into()),
            (KernelFile::BlockSparse.body(), "BS_TQ", bs::TILE as u64),
        ];
        for (src, name, host) in cases {
            assert_eq!(define(src, name), Some(host), "#define {name}");
        }
        assert_eq!(define("#define X 0x10u\n", "X"), Some(16));
        assert_eq!(define("#define XY 3\n", "X"), None);
    }
}
