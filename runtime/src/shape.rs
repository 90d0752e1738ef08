//! The tensor layout shared by executors, hooks and statistics.

use crate::error::{Error, Result};

/// Shape of one layer's attention problem for one sequence (batch 1).
///
/// Query head `h` reads KV head `h / (q_heads / kv_heads)` (grouped-query attention).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub seq_len: usize,
    pub head_dim: usize,
}

impl AttnShape {
    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads.max(1)
    }

    /// KV head read by query head `h`.
    pub fn kv_head_of(&self, h: usize) -> usize {
        h / self.group().max(1)
    }

    /// Elements of Q (and of the output): `q_heads * seq_len * head_dim`.
    pub fn q_len(&self) -> Option<usize> {
        self.q_heads
            .checked_mul(self.seq_len)?
            .checked_mul(self.head_dim)
    }

    /// Elements of K (and of V): `kv_heads * seq_len * head_dim`.
    pub fn kv_len(&self) -> Option<usize> {
        self.kv_heads
            .checked_mul(self.seq_len)?
            .checked_mul(self.head_dim)
    }

    /// Checks the head counts are consistent (non-zero, `q_heads` a multiple of `kv_heads`).
    pub fn check(&self) -> Result<()> {
        if self.q_heads == 0 || self.kv_heads == 0 || self.head_dim == 0 {
            return Err(Error::Shape(format!("zero-sized attention shape {self:?}")));
        }
        if self.q_heads % self.kv_heads != 0 {
            return Err(Error::Shape(format!(
                "q_heads {} is not a multiple of kv_heads {}",
                self.q_heads, self.kv_heads
            )));
        }
        Ok(())
    }

    /// [`Error::Shape`] unless an output buffer of `len` elements fits this shape (`q_len`).
    pub fn check_out(&self, len: usize) -> Result<()> {
        let want = self
            .q_len()
            .ok_or_else(|| Error::Shape(format!("attention shape {self:?} overflows usize")))?;
        if len != want {
            return Err(Error::Shape(format!(
                "output has {len} elements, shape {self:?} needs {want}"
            )));
        }
        Ok(())
    }
}

/// One layer's Q, K, V after RoPE, borrowed, in the layout of [`AttnShape`].
#[derive(Debug, Clone, Copy)]
pub struct AttentionInput<'a> {
    pub shape: AttnShape,
    /// `[q_heads, seq_len, head_dim]`
    pub q: &'a [f32],
    /// `[kv_heads, seq_len, head_dim]`
    pub k: &'a [f32],
    /// `[kv_heads, seq_len, head_dim]`
    pub v: &'a [f32],
}

impl<'a> AttentionInput<'a> {
    /// Builds a view after checking every slice has the length the shape implies.
    pub fn new(shape: AttnShape, q: &'a [f32], k: &'a [f32], v: &'a [f32]) -> Result<Self> {
        shape.check()?;
        let overflow = || Error::Shape(format!("attention shape {shape:?} overflows usize"));
        let q_len = shape.q_len().ok_or_else(overflow)?;
        let kv_len = shape.kv_len().ok_or_else(overflow)?;
        for (name, got, want) in [
            ("q", q.len(), q_len),
            ("k", k.len(), kv_len),
            ("v", v.len(), kv_len),
        ] {
            if got != want {
                return Err(Error::Shape(format!(
                    "{name} has {got} elements, shape {shape:?} needs {want}"
                )));
            }
        }
        Ok(Self { shape, q, k, v })
    }

    /// Row `pos` of query head `h`: `head_dim` values.
    pub fn q_row(&self, h: usize, pos: usize) -> &'a [f32] {
        let d = self.shape.head_dim;
        let start = (h * self.shape.seq_len + pos) * d;
        &self.q[start..start + d]
    }

    /// Row `pos` of KV head `kv` of K.
    pub fn k_row(&self, kv: usize, pos: usize) -> &'a [f32] {
        let d = self.shape.head_dim;
        let start = (kv * self.shape.seq_len + pos) * d;
        &self.k[start..start + d]
    }

    /// Row `pos` of KV head `kv` of V.
    pub fn v_row(&self, kv: usize, pos: usize) -> &'a [f32] {
        let d = self.shape.head_dim;
        let start = (kv * self.shape.seq_len + pos) * d;
        &self.v[start..start + d]
    }

    /// All of K for KV head `kv`: `[seq_len, head_dim]`.
    pub fn k_head(&self, kv: usize) -> &'a [f32] {
        let n = self.shape.seq_len * self.shape.head_dim;
        &self.k[kv * n..(kv + 1) * n]
    }

    /// All of V for KV head `kv`: `[seq_len, head_dim]`.
    pub fn v_head(&self, kv: usize) -> &'a [f32] {
        let n = self.shape.seq_len * self.shape.head_dim;
        &self.v[kv * n..(kv + 1) * n]
    }

    /// All of Q for query head `h`: `[seq_len, head_dim]`.
    pub fn q_head(&self, h: usize) -> &'a [f32] {
        let n = self.shape.seq_len * self.shape.head_dim;
        &self.q[h * n..(h + 1) * n]
    }
}
