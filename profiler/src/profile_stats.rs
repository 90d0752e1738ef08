//! [`HeadStats`] in a [`Profile`]: which tensors hold them.
//!
//! Per sample `k` (its position in `ProfileMeta::sample_ids`), layer `l`, query head `h`, the
//! sufficient statistics are kept apart, so the calibrator can report the worst sample as well as the
//! mean: `S{k}.L{l}.H{h}.{field}`. The block-pooled heat map, which is large and only descriptive, is
//! kept summed over samples: `L{l}.H{h}.heat` (rows flattened; row `qb` has one entry per causal key block) and `.heat_rows`.
//!
//! With a tail (`ProfileMeta::tail_q > 0`), the same fields restricted to the last query blocks are
//! stored as `S{k}.L{l}.H{h}.tail.{field}` ([`HeadStats::tail`]).
//!
//! Fields (all f64): `scalars` `[samples, rows, dense_cells, max_len, sink_mass, entropy_bits,
//! block_q, block_k, last_q]`, `edges`, `distance_mass`, `vs_mass`/`vs_cells` and `as_mass`/`as_cells`
//! (`[buckets, buckets]`), `topk_mass`/`topk_cells`, `cov_mass`/`cov_cells`.

use std::path::Path;

use crate::error::{Error, Result};
use crate::profile::{Profile, StatTensor};
use crate::stats::{Curve, HeadStats, RankHistogram};

const SCALARS: usize = 9;

/// Field-name prefix of the tail's statistics (`S{k}.L{l}.H{h}.tail.{field}`).
const TAIL: &str = "tail.";

fn key(sample: usize, layer: usize, head: usize, field: &str) -> String {
    format!("S{sample}.{}", Profile::key(layer, head, field))
}

fn bad(path: &Path, field: &str, message: impl Into<String>) -> Error {
    Error::Model {
        path: path.to_path_buf(),
        field: field.to_string(),
        message: message.into(),
    }
}

/// Causal key blocks of query block `qb` in a sequence of `n` tokens: one heat-map row's length.
fn heat_row_len(qb: usize, n: usize, block_q: usize, block_k: usize) -> usize {
    let last_row = ((qb + 1) * block_q).min(n).saturating_sub(1);
    last_row / block_k.max(1) + 1
}

impl Profile {
    /// Stores one sample's statistics of one layer (`stats[h]` for query head `h`) as sample `sample`.
    pub fn put_sample_stats(
        &mut self,
        sample: usize,
        layer: usize,
        stats: &[HeadStats],
    ) -> Result<()> {
        for (h, s) in stats.iter().enumerate() {
            self.put_fields(sample, layer, h, "", s)?;
            match (&s.tail, self.meta.tail_q) {
                (Some(t), q) if q > 0 => self.put_fields(sample, layer, h, TAIL, t)?,
                (None, 0) => {}
                (t, q) => {
                    return Err(Error::Profile(format!(
                    "layer {layer} head {h}: statistics {} a tail but the profile's tail_q is {q}",
                    if t.is_some() { "with" } else { "without" }
                )))
                }
            }
            for (qb, row) in s.heat.iter().enumerate() {
                if row.len() != heat_row_len(qb, s.max_len, s.block_q, s.block_k) {
                    return Err(Error::Profile(format!(
                        "layer {layer} head {h}: heat row {qb} has {} key blocks",
                        row.len()
                    )));
                }
            }
            let flat: Vec<f64> = s.heat.iter().flatten().copied().collect();
            let rows: Vec<f64> = s.heat_rows.iter().map(|&r| r as f64).collect();
            self.accumulate(&Profile::key(layer, h, "heat"), &[flat.len()], &flat)?;
            self.accumulate(&Profile::key(layer, h, "heat_rows"), &[rows.len()], &rows)?;
        }
        Ok(())
    }

    /// Stores the sufficient statistics of `s` (no heat map) under field names starting with
    /// `prefix`.
    fn put_fields(
        &mut self,
        sample: usize,
        layer: usize,
        h: usize,
        prefix: &str,
        s: &HeadStats,
    ) -> Result<()> {
        let scalars = [
            s.samples as f64,
            s.rows as f64,
            s.dense_cells,
            s.max_len as f64,
            s.sink_mass,
            s.entropy_bits,
            s.block_q as f64,
            s.block_k as f64,
            s.last_q as f64,
        ];
        let edges: Vec<f64> = s.edges.iter().map(|&e| f64::from(e)).collect();
        let vs = s.vertical_slash.buckets;
        let asb = s.a_shape.buckets;
        let fields: [(&str, Vec<usize>, &[f64]); 11] = [
            ("scalars", vec![SCALARS], &scalars),
            ("edges", vec![edges.len()], &edges),
            (
                "distance_mass",
                vec![s.distance_mass.len()],
                &s.distance_mass,
            ),
            ("vs_mass", vec![vs, vs], &s.vertical_slash.mass),
            ("vs_cells", vec![vs, vs], &s.vertical_slash.cells),
            ("as_mass", vec![asb, asb], &s.a_shape.mass),
            ("as_cells", vec![asb, asb], &s.a_shape.cells),
            (
                "topk_mass",
                vec![s.block_top_k.mass.len()],
                &s.block_top_k.mass,
            ),
            (
                "topk_cells",
                vec![s.block_top_k.cells.len()],
                &s.block_top_k.cells,
            ),
            (
                "cov_mass",
                vec![s.block_coverage.mass.len()],
                &s.block_coverage.mass,
            ),
            (
                "cov_cells",
                vec![s.block_coverage.cells.len()],
                &s.block_coverage.cells,
            ),
        ];
        let dynamic: [(&str, Vec<usize>, &[f64]); 2] = [
            ("dyn_mass", vec![s.dynamic.mass.len()], &s.dynamic.mass),
            ("dyn_cells", vec![s.dynamic.cells.len()], &s.dynamic.cells),
        ];
        let scored = !s.dynamic.mass.is_empty();
        for (field, shape, data) in fields
            .into_iter()
            .chain(dynamic.into_iter().filter(|_| scored))
        {
            let name = key(sample, layer, h, &format!("{prefix}{field}"));
            if self.tensors.contains_key(&name) {
                return Err(Error::Profile(format!("{name} is already stored")));
            }
            self.accumulate(&name, &shape, data)?;
        }
        Ok(())
    }

    /// The statistics of sample `sample`, (`layer`, `head`), without the heat map; with its tail
    /// when the profile kept one.
    pub fn sample_stats(
        &self,
        path: &Path,
        sample: usize,
        layer: usize,
        head: usize,
    ) -> Result<HeadStats> {
        let mut s = self.read_fields(path, sample, layer, head, "")?;
        if self.meta.tail_q > 0 {
            s.tail = Some(Box::new(self.read_fields(path, sample, layer, head, TAIL)?));
        }
        Ok(s)
    }

    /// The sufficient statistics stored under field names starting with `prefix`.
    fn read_fields(
        &self,
        path: &Path,
        sample: usize,
        layer: usize,
        head: usize,
        prefix: &str,
    ) -> Result<HeadStats> {
        let name = |field: &str| key(sample, layer, head, &format!("{prefix}{field}"));
        let get = |field: &str| -> Result<&StatTensor> { self.tensor(path, &name(field)) };
        let scalars = &get("scalars")?.data;
        if scalars.len() != SCALARS {
            return Err(bad(
                path,
                &name("scalars"),
                format!("{} values, expected {SCALARS}", scalars.len()),
            ));
        }
        let count = |x: f64, field: &str| -> Result<usize> {
            if x >= 0.0 && x.fract() == 0.0 && x < 1e15 {
                Ok(x as usize)
            } else {
                Err(bad(
                    path,
                    &name("scalars"),
                    format!("{field} = {x}, expected a count"),
                ))
            }
        };
        let hist = |m: &str, c: &str| -> Result<RankHistogram> {
            let (mass, cells) = (get(m)?, get(c)?);
            let buckets = mass.shape.first().copied().unwrap_or(0);
            if mass.shape != [buckets, buckets] || cells.shape != mass.shape {
                return Err(bad(
                    path,
                    &name(m),
                    format!("shape {:?}, expected a square matching {c}", mass.shape),
                ));
            }
            Ok(RankHistogram {
                buckets,
                mass: mass.data.clone(),
                cells: cells.data.clone(),
            })
        };
        let curve = |m: &str, c: &str| -> Result<Curve> {
            let (mass, cells) = (get(m)?, get(c)?);
            if mass.data.len() != cells.data.len() {
                return Err(bad(path, &name(m), "mass and cells differ in length"));
            }
            Ok(Curve {
                mass: mass.data.clone(),
                cells: cells.data.clone(),
            })
        };
        let edges = get("edges")?
            .data
            .iter()
            .map(|&e| {
                count(e, "edges").and_then(|e| {
                    u32::try_from(e).map_err(|_| bad(path, "edges", "edge too large"))
                })
            })
            .collect::<Result<Vec<u32>>>()?;
        let vertical_slash = hist("vs_mass", "vs_cells")?;
        if vertical_slash.buckets != edges.len() {
            return Err(bad(
                path,
                &name("vs_mass"),
                format!(
                    "{} buckets for {} edges",
                    vertical_slash.buckets,
                    edges.len()
                ),
            ));
        }
        Ok(HeadStats {
            samples: count(scalars[0], "samples")? as u64,
            rows: count(scalars[1], "rows")? as u64,
            dense_cells: scalars[2],
            max_len: count(scalars[3], "max_len")?,
            sink_mass: scalars[4],
            entropy_bits: scalars[5],
            block_q: count(scalars[6], "block_q")?,
            block_k: count(scalars[7], "block_k")?,
            last_q: count(scalars[8], "last_q")?,
            edges,
            distance_mass: get("distance_mass")?.data.clone(),
            heat: Vec::new(),
            heat_rows: Vec::new(),
            vertical_slash,
            a_shape: hist("as_mass", "as_cells")?,
            block_top_k: curve("topk_mass", "topk_cells")?,
            block_coverage: curve("cov_mass", "cov_cells")?,
            dynamic: if self.meta.dynamic.is_empty() {
                Curve::default()
            } else {
                let c = curve("dyn_mass", "dyn_cells")?;
                if c.mass.len() != self.meta.dynamic.len() {
                    return Err(bad(
                        path,
                        &name("dyn_mass"),
                        format!(
                            "{} values for the {} dynamic candidates of the metadata",
                            c.mass.len(),
                            self.meta.dynamic.len()
                        ),
                    ));
                }
                c
            },
            tail: None,
        })
    }

    /// Every sample's statistics of (`layer`, `head`), in sample order.
    pub fn per_sample_stats(
        &self,
        path: &Path,
        layer: usize,
        head: usize,
    ) -> Result<Vec<HeadStats>> {
        (0..self.meta.sample_ids.len())
            .map(|k| self.sample_stats(path, k, layer, head))
            .collect()
    }

    /// The statistics of (`layer`, `head`) summed over samples, heat map included.
    pub fn head_stats(&self, path: &Path, layer: usize, head: usize) -> Result<HeadStats> {
        let mut samples = self.per_sample_stats(path, layer, head)?.into_iter();
        let mut total = samples
            .next()
            .ok_or_else(|| bad(path, "sample_ids", "the profile holds no samples"))?;
        for s in samples {
            total.merge(&s)?;
        }
        let flat = &self.tensor(path, &Profile::key(layer, head, "heat"))?.data;
        let rows = &self
            .tensor(path, &Profile::key(layer, head, "heat_rows"))?
            .data;
        let mut heat = Vec::with_capacity(rows.len());
        let mut at = 0usize;
        for qb in 0..rows.len() {
            let len = heat_row_len(qb, total.max_len, total.block_q, total.block_k);
            let row = flat.get(at..at + len).ok_or_else(|| {
                bad(
                    path,
                    &Profile::key(layer, head, "heat"),
                    "shorter than its query blocks need",
                )
            })?;
            heat.push(row.to_vec());
            at += len;
        }
        if at != flat.len() {
            return Err(bad(
                path,
                &Profile::key(layer, head, "heat"),
                "longer than its query blocks need",
            ));
        }
        total.heat = heat;
        total.heat_rows = rows.iter().map(|&r| r as u64).collect();
        Ok(total)
    }
}
