//! Buffers of finished layers, kept for the next layers of the same thread's pass. A layer's
//! output is written whole by its producer (a GEMM's stores, a pool, the branches of a
//! concatenation, the quantizer), so a kept buffer is handed out with its old values instead of
//! a fresh zeroed one: zeroing (calloc of a reused heap chunk) was 2-3% of a pass.

use std::cell::RefCell;
use std::thread::LocalKey;

/// At most this many buffers a thread and type,
const KEEP: usize = 6;
/// holding at most this many bytes (the largest activation, the stem's 147 x 147 x 64 f32 at
/// 299 px, and a few of the blocks').
const KEEP_BYTES: usize = 12 << 20;
/// Smaller buffers are not worth keeping.
const MIN_BYTES: usize = 16 << 10;

thread_local! {
    static F32: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
    static U8: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

pub(crate) trait Kept: Copy + Default + 'static {
    fn pool() -> &'static LocalKey<RefCell<Vec<Vec<Self>>>>;
}

impl Kept for f32 {
    fn pool() -> &'static LocalKey<RefCell<Vec<Vec<Self>>>> {
        &F32
    }
}

impl Kept for u8 {
    fn pool() -> &'static LocalKey<RefCell<Vec<Vec<Self>>>> {
        &U8
    }
}

/// `len` values for the caller to overwrite: the smallest kept buffer that holds them (old
/// values), else zeros.
pub(crate) fn take<T: Kept>(len: usize) -> Vec<T> {
    T::pool().with(|p| {
        let mut p = p.borrow_mut();
        let fit = (0..p.len()).filter(|&i| p[i].len() >= len).min_by_key(|&i| p[i].len());
        match fit {
            Some(i) => {
                let mut v = p.swap_remove(i);
                v.truncate(len);
                v
            }
            None => vec![T::default(); len],
        }
    })
}

/// Keep `v` for the next `take` on this thread (the smallest kept make room).
pub(crate) fn give<T: Kept>(v: Vec<T>) {
    let size = std::mem::size_of::<T>();
    if v.len() * size < MIN_BYTES {
        return;
    }
    T::pool().with(|p| {
        let mut p = p.borrow_mut();
        p.push(v);
        p.sort_by_key(|v| std::cmp::Reverse(v.len()));
        let mut bytes = 0;
        let keep = p
            .iter()
            .take(KEEP)
            .take_while(|v| {
                bytes += v.len() * size;
                bytes <= KEEP_BYTES
            })
            .count();
        p.truncate(keep);
    });
}

/// Drop this thread's kept buffers (at the end of a pass: the next may run elsewhere).
pub(crate) fn clear() {
    F32.with(|p| p.borrow_mut().clear());
    U8.with(|p| p.borrow_mut().clear());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_buffers_are_reused_best_fit_and_bounded() {
        clear();
        give(vec![1.0f32; 10_000]);
        give(vec![2.0f32; 20_000]);
        // the smallest that fits, truncated, old values
        let v: Vec<f32> = take(9_000);
        assert_eq!((v.len(), v[0]), (9_000, 1.0));
        // none fits: zeros
        let w: Vec<f32> = take(30_000);
        assert!(w.iter().all(|x| *x == 0.0));
        // small ones are not kept; the bytes are bounded
        give(vec![3u8; 100]);
        assert!(U8.with(|p| p.borrow().is_empty()));
        for _ in 0..10 {
            give(vec![0.0f32; 2 << 20]);
        }
        assert!(F32.with(|p| p.borrow().iter().map(|v| v.len() * 4).sum::<usize>()) <= KEEP_BYTES);
        clear();
        assert!(F32.with(|p| p.borrow().is_empty()));
    }
}
