//! AMX int8 (Intel Sapphire Rapids and later): `tdpbusd` multiplies a 16 x 64 tile of u8 by a
//! 16 x 64 tile of i8 k-quads into a 16 x 16 tile of i32 sums, 16,384 multiply-adds an
//! instruction (VNNI: 64). Four accumulator tiles cover 32 rows x 32 columns.
//!
//! B's panels are already AMX's B layout (a line is 16 columns x 4 consecutive k, one line a
//! k-step), so a 16-step chunk of a panel slice is one B tile; a k-block's last chunk, where
//! shorter, is copied into a zero-padded tile. A's rows are loaded with their own stride where
//! they have one (dense rows, 1 x 1 stride-1 convolutions, whole tiles of whole chunks),
//! otherwise the task's rows are gathered first. The k-blocks, the epilogue and its order of
//! float operations are the VNNI kernel's, so the two give bit-identical results.

use super::avx512::Store;
use super::{Epilogue, NR, Out, Panels, Plan, Rows, TileEpi};
use std::arch::asm;
use std::arch::x86_64::*;

/// Rows a task takes at most (a multiple of the 32 rows of the accumulator tiles): a k-block
/// of them (<= 512 KiB) stays in L2 while each pair of panels' slices (64 KiB) runs over them.
const MC: usize = 256;

/// Whether this CPU and OS run AMX int8 (AMX-TILE and AMX-INT8 in CPUID leaf 7, AVX-512 for
/// the epilogue, and Linux granting the process the tile data state, asked once).
pub(super) fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        // CPUID leaf 7 exists on every x86-64 CPU with AVX-512 (checked first)
        let ids = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && __cpuid_count(7, 0).edx & (3 << 24) == 3 << 24;
        ids && request_tile_data()
    })
}

#[cfg(target_os = "linux")]
fn request_tile_data() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes the process's permitted state.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> bool {
    false
}

/// The tile configuration: palette 1, tiles 0-3 (C), 4-5 (A) and 6-7 (B) all 16 rows of 64
/// bytes.
#[repr(C, align(64))]
struct TileCfg {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CFG: TileCfg = TileCfg {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// Per-thread buffers: gathered rows, the zero-padded last B chunk of every panel of the task,
/// and the accumulators as stored (32 x 32 i32).
#[derive(Default)]
struct Buffers {
    rows: Vec<u8>,
    tails: Vec<u8>,
}

thread_local! {
    static BUFFERS: std::cell::RefCell<Buffers> = std::cell::RefCell::new(Buffers::default());
}

/// The int8 GEMM on AMX, as [`super::qgemm`] with the checks done.
///
/// # Safety
/// [`available`] is true; the caller checked `a` against `m` and `b`, C against `m`, `ldc`,
/// `c0` and `b.n`, and `scale` / `epi.bias` against `b.n`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn qgemm(
    m: usize,
    a: Rows<'_, u8>,
    b: &Panels,
    scale: &[f32],
    c: &mut [f32],
    ldc: usize,
    c0: usize,
    epi: Epilogue<'_>,
) {
    let (kc, n) = (b.kc, b.n);
    let nkb = b.steps.div_ceil(kc);
    let plan = Plan::new(m, n.div_ceil(NR), 32, MC);
    let out = Out(c.as_mut_ptr());
    let lines = b.data.bytes();
    // rows with one stride, and k-blocks of whole chunks: tiles load straight from A
    let strided = match a {
        Rows::Dense { data, ld } => Some((data, ld, 0)),
        Rows::Conv { data, ld, c0, k: [1, 1], stride: 1, pad: [0, 0], hw, out, .. } if hw == out => {
            Some((data, ld, c0))
        }
        _ => None,
    };
    let whole_chunks = kc.is_multiple_of(16) && b.steps.is_multiple_of(16);
    let task = |t: usize| {
        let ((r0, r1), (p0, p1)) = plan.task(t);
        let rows16 = (r1 - r0).next_multiple_of(16);
        BUFFERS.with(|buf| {
            let buf = &mut *buf.borrow_mut();
            // SAFETY: AMX is available (the caller's contract); the configuration is valid.
            unsafe { asm!("ldtilecfg [{}]", in(reg) &CFG, options(nostack, readonly)) };
            for kb in 0..nkb {
                let s0 = kb * kc;
                let kcb = kc.min(b.steps - s0);
                let chunks = kcb.div_ceil(16);
                let direct = strided.filter(|_| whole_chunks && (r1 - r0).is_multiple_of(16));
                let (ap, lda) = match direct {
                    Some((data, ld, ch0)) => (data[r0 * ld + ch0 + s0 * 4..].as_ptr(), ld),
                    None => {
                        // whole 64-byte chunks per row; the bytes past the block meet the
                        // padded B chunk's zeros
                        let ldg = chunks * 64;
                        if buf.rows.len() < rows16 * ldg {
                            buf.rows.resize(rows16 * ldg, 0);
                        }
                        a.gather(r0, r1, s0 * 4, kcb * 4, &mut buf.rows, ldg);
                        (buf.rows.as_ptr(), ldg)
                    }
                };
                // the last chunk of each panel, zero-padded to 16 steps
                let tail = kcb % 16;
                if tail != 0 {
                    buf.tails.clear();
                    buf.tails.resize((p1 - p0) * 1024, 0);
                    for p in p0..p1 {
                        let src = (b.slice(s0, kcb, p) + kcb - tail) * 64;
                        buf.tails[(p - p0) * 1024..][..tail * 64].copy_from_slice(&lines[src..src + tail * 64]);
                    }
                }
                for p in (p0..p1).step_by(2) {
                    let np = (p1 - p).min(2);
                    let bq = |q: usize| lines[b.slice(s0, kcb, p + q.min(np - 1)) * 64..].as_ptr();
                    let tails = |q: usize| buf.tails[(p + q.min(np - 1) - p0) * 1024..].as_ptr();
                    let bp = [bq(0), bq(1)];
                    let bt = if tail != 0 { [tails(0), tails(1)] } else { [std::ptr::null(); 2] };
                    let (j0, cols) = (p * NR, (np * NR).min(n - p * NR));
                    let e = TileEpi::of_block(&epi, Some(scale), j0, cols, kb, nkb);
                    for i0 in (0..rows16).step_by(32) {
                        let nt = if rows16 - i0 > 16 { 2 } else { 1 };
                        let rows = (r1 - r0 - i0).min(32);
                        let st = Store { c: out.at((r0 + i0) * ldc + c0 + j0), ldc, rows, cols, e: &e };
                        // SAFETY: the tiles read lie in A (or the gathered rows) and B, as
                        // checked by the caller; the store is inside C and this task's own.
                        unsafe {
                            let a = Tiles { a: ap.add(i0 * lda), lda, b: bp, tails: bt, chunks, tail: tail != 0 };
                            match (nt, np) {
                                (2, 2) => block::<2, 2>(&a, &st),
                                (2, _) => block::<2, 1>(&a, &st),
                                (_, 2) => block::<1, 2>(&a, &st),
                                _ => block::<1, 1>(&a, &st),
                            }
                        }
                    }
                }
            }
            // SAFETY: AMX is available; releases this thread's tile state.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        });
    };
    plan.run(task);
}

/// Where one block's tiles come from: A's first row (`lda` bytes a row, 64 a chunk), each
/// panel's slice (1024 bytes a chunk), and the zero-padded last chunks where `tail`.
struct Tiles {
    a: *const u8,
    lda: usize,
    b: [*const u8; 2],
    tails: [*const u8; 2],
    chunks: usize,
    tail: bool,
}

/// `NT` x 16 rows by `NP` x 16 columns: the sums over the k-block's chunks, then the epilogue.
///
/// # Safety
/// AMX configured with [`CFG`] on this thread; AVX-512F; the tiles lie in valid memory; the
/// store's region is inside C.
#[target_feature(enable = "avx512f")]
unsafe fn block<const NT: usize, const NP: usize>(t: &Tiles, st: &Store<'_, '_>) {
    let mut acc = std::mem::MaybeUninit::<[i32; 32 * 32]>::uninit();
    // SAFETY: the caller's contract; tiles 0-3 accumulate, 4-5 hold A, 6-7 hold B.
    unsafe {
        asm!("tilezero tmm0", options(nostack, nomem));
        if NP > 1 {
            asm!("tilezero tmm1", options(nostack, nomem));
        }
        if NT > 1 {
            asm!("tilezero tmm2", options(nostack, nomem));
            if NP > 1 {
                asm!("tilezero tmm3", options(nostack, nomem));
            }
        }
        for ch in 0..t.chunks {
            let last = t.tail && ch + 1 == t.chunks;
            let bq = |q: usize| if last { t.tails[q] } else { t.b[q].add(ch * 1024) };
            let a0 = t.a.add(ch * 64);
            asm!("tileloadd tmm4, [{p} + {s}*1]", p = in(reg) a0, s = in(reg) t.lda, options(nostack, readonly));
            asm!("tileloadd tmm6, [{p} + {s}*1]", p = in(reg) bq(0), s = in(reg) 64usize, options(nostack, readonly));
            asm!("tdpbusd tmm0, tmm4, tmm6", options(nostack, nomem));
            if NP > 1 {
                asm!("tileloadd tmm7, [{p} + {s}*1]", p = in(reg) bq(1), s = in(reg) 64usize, options(nostack, readonly));
                asm!("tdpbusd tmm1, tmm4, tmm7", options(nostack, nomem));
            }
            if NT > 1 {
                let a1 = a0.add(16 * t.lda);
                asm!("tileloadd tmm5, [{p} + {s}*1]", p = in(reg) a1, s = in(reg) t.lda, options(nostack, readonly));
                asm!("tdpbusd tmm2, tmm5, tmm6", options(nostack, nomem));
                if NP > 1 {
                    asm!("tdpbusd tmm3, tmm5, tmm7", options(nostack, nomem));
                }
            }
        }
        // the accumulators row-major, 32 i32 (128 bytes) a row
        let c = acc.as_mut_ptr().cast::<u8>();
        let acc = acc.as_ptr().cast::<i32>();
        asm!("tilestored [{p} + {s}*1], tmm0", p = in(reg) c, s = in(reg) 128usize, options(nostack));
        if NP > 1 {
            asm!("tilestored [{p} + {s}*1], tmm1", p = in(reg) c.add(64), s = in(reg) 128usize, options(nostack));
        }
        if NT > 1 {
            asm!("tilestored [{p} + {s}*1], tmm2", p = in(reg) c.add(2048), s = in(reg) 128usize, options(nostack));
            if NP > 1 {
                asm!("tilestored [{p} + {s}*1], tmm3", p = in(reg) c.add(2112), s = in(reg) 128usize, options(nostack));
            }
        }
        let e = st.e;
        let (mut scale, mut bias) = ([0.0f32; 32], [0.0f32; 32]);
        scale[..st.cols].copy_from_slice(e.scale.unwrap_or(&[1.0; 32][..st.cols]));
        if let Some(v) = e.bias {
            bias[..st.cols].copy_from_slice(v);
        }
        let sv: [__m512; NP] = std::array::from_fn(|q| _mm512_loadu_ps(scale.as_ptr().add(16 * q)));
        let bv: [__m512; NP] = std::array::from_fn(|q| _mm512_loadu_ps(bias.as_ptr().add(16 * q)));
        // rows i < st.rows <= 16 NT and tiles q < NP: all stored above
        for i in 0..st.rows {
            let f: [__m512; NP] = std::array::from_fn(|q| {
                let v = _mm512_loadu_si512(acc.add(i * 32 + 16 * q).cast());
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), sv[q], bv[q])
            });
            st.row(f, i);
        }
    }
}
