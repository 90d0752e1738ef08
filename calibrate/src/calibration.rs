//! Calibration from profiles: the search over every head, held-out validation, and the plan.
//!
//! [`calibrate`] takes calibration profiles (one per sequence length), optional held-out profiles of
//! the same lengths, and a [`Goal`]; it returns the [`Calibration`]: one [`HeadResult`] per head
//! (chosen candidate per length, recall, held-out recall, MInference's choice on the same statistics)
//! and the plan built from them ([`crate::emit`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use profiler::profile::Profile;
use rayon::prelude::*;
use serde::Serialize;

use crate::search::minference::{self, MInferenceChoice};
use crate::search::{best_per_family, choose, Goal, HeadSamples, Scored};
use crate::Error;

/// A profile and the file it came from (for error messages).
pub struct ProfileFile {
    pub path: PathBuf,
    pub profile: Profile,
}

impl ProfileFile {
    pub fn read(path: &Path) -> Result<Self, Error> {
        Ok(Self {
            path: path.to_path_buf(),
            profile: Profile::read(path)?,
        })
    }
}

/// The outcome for one head.
#[derive(Debug, Clone, Serialize)]
pub struct HeadResult {
    pub layer: usize,
    pub head: usize,
    /// Chosen candidate per calibrated length, in length order.
    pub chosen: Vec<Scored>,
    /// Held-out recall (mean over rows) of the chosen candidate per length, when held-out data exist.
    pub heldout: Option<Vec<f64>>,
    /// Held-out recall of the last rows per length, when held-out data with a tail exist.
    pub heldout_tail: Option<Vec<f64>>,
    /// MInference's choice per length.
    pub minference: Vec<MInferenceChoice>,
    /// MInference's single default, vertical-slash (1000, 6096), per length.
    pub minference_default: Vec<Scored>,
}

impl HeadResult {
    pub fn recall(&self) -> f64 {
        mean(self.chosen.iter().map(|s| s.recall))
    }
    pub fn worst(&self) -> f64 {
        self.chosen
            .iter()
            .map(|s| s.worst)
            .fold(f64::INFINITY, f64::min)
    }
    pub fn density(&self) -> f64 {
        mean(self.chosen.iter().map(|s| s.density))
    }
    pub fn validated(&self) -> Option<f64> {
        self.heldout.as_ref().map(|v| mean(v.iter().copied()))
    }
    /// Lowest held-out recall over lengths.
    pub fn validated_min(&self) -> Option<f64> {
        lowest(self.heldout.as_deref())
    }
    /// Lowest held-out recall of the last rows over lengths.
    pub fn validated_tail_min(&self) -> Option<f64> {
        lowest(self.heldout_tail.as_deref())
    }
    /// Whether the held-out recall misses the goal's target (or its tail target, when set) by more
    /// than `tolerance` at some length.
    pub fn misses(&self, goal: &Goal, tolerance: f64) -> bool {
        let below = |r: Option<f64>, target: f64| r.is_some_and(|r| r < target - tolerance);
        below(self.validated_min(), goal.target_recall)
            || goal
                .tail_recall
                .is_some_and(|t| below(self.validated_tail_min(), t))
    }
}

fn lowest(values: Option<&[f64]>) -> Option<f64> {
    values.map(|v| v.iter().copied().fold(f64::INFINITY, f64::min))
}

pub(crate) fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = values.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        0.0
    } else {
        s / n as f64
    }
}

/// Everything [`calibrate`] found.
pub struct Calibration {
    pub heads: Vec<HeadResult>,
    /// Calibrated lengths, increasing.
    pub seq_lens: Vec<u64>,
    pub goal: Goal,
    /// The profiles' dynamic candidates ([`crate::search::Candidate::Dynamic`] indexes into it).
    pub dynamic: Vec<schemas::Pattern>,
}

fn bad(path: &Path, field: &str, message: impl Into<String>) -> Error {
    Error::Input {
        path: path.to_path_buf(),
        field: field.to_string(),
        message: message.into(),
    }
}

/// Checks the profiles belong together and to this tool, and orders them by length.
fn check_profiles(
    calib: &mut [ProfileFile],
    heldout: &mut [ProfileFile],
    tool: &str,
) -> Result<(), Error> {
    let Some(first) = calib.first() else {
        return Err(Error::Usage("no calibration profile given".into()));
    };
    let reference = first.profile.meta.clone();
    for f in calib.iter().chain(heldout.iter()) {
        let m = &f.profile.meta;
        if m.tool != tool {
            return Err(bad(
                &f.path,
                "tool",
                format!(
                    "made by {}, this is {tool}: profile again with this version",
                    m.tool
                ),
            ));
        }
        if m.model.fingerprint != reference.model.fingerprint {
            return Err(bad(
                &f.path,
                "model.fingerprint",
                format!(
                    "{} ({}), but {} is for {} ({})",
                    m.model.fingerprint,
                    m.model.name.as_deref().unwrap_or("?"),
                    first.path.display(),
                    reference.model.fingerprint,
                    reference.model.name.as_deref().unwrap_or("?")
                ),
            ));
        }
        for (field, a, b) in [
            ("block_q", m.block_q, reference.block_q),
            ("block_k", m.block_k, reference.block_k),
            ("last_q", m.last_q, reference.last_q),
            ("tail_q", m.tail_q, reference.tail_q),
        ] {
            if a != b {
                return Err(bad(
                    &f.path,
                    field,
                    format!("{a}, but {} has {b}", first.path.display()),
                ));
            }
        }
        if m.dynamic != reference.dynamic {
            return Err(bad(
                &f.path,
                "dynamic",
                format!(
                    "{} dynamic candidates that differ from the {} of {}: profile every input with \
                     the same --no-dynamic / --grid options",
                    m.dynamic.len(),
                    reference.dynamic.len(),
                    first.path.display()
                ),
            ));
        }
        if m.samples == 0 || m.sample_ids.is_empty() {
            return Err(bad(&f.path, "samples", "the profile holds no samples"));
        }
        let layers: Vec<u32> = (0..m.model.layers).collect();
        if m.layers != layers {
            return Err(bad(
                &f.path,
                "layers",
                format!(
                    "holds layers {:?}; merge the layer ranges into one profile first",
                    m.layers
                ),
            ));
        }
    }
    calib.sort_by_key(|f| f.profile.meta.seq_len);
    for pair in calib.windows(2) {
        if pair[0].profile.meta.seq_len == pair[1].profile.meta.seq_len {
            return Err(bad(
                &pair[1].path,
                "seq_len",
                format!(
                    "{} tokens like {}: merge profiles of one length with `attnplan merge` first",
                    pair[1].profile.meta.seq_len,
                    pair[0].path.display()
                ),
            ));
        }
    }
    let lens: Vec<u64> = calib.iter().map(|f| f.profile.meta.seq_len).collect();
    heldout.sort_by_key(|f| f.profile.meta.seq_len);
    for h in heldout.iter() {
        if !lens.contains(&h.profile.meta.seq_len) {
            return Err(bad(
                &h.path,
                "seq_len",
                format!(
                    "{} tokens, but calibration profiles are at {lens:?}",
                    h.profile.meta.seq_len
                ),
            ));
        }
        for c in calib.iter() {
            if let Some(id) = h
                .profile
                .meta
                .sample_ids
                .iter()
                .find(|id| c.profile.meta.sample_ids.contains(id))
            {
                return Err(bad(
                    &h.path,
                    "sample_ids",
                    format!(
                        "sample {id:?} is also in {}: held-out samples must not be calibration samples",
                        c.path.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn head_samples(f: &ProfileFile, layer: usize, head: usize) -> Result<HeadSamples, Error> {
    let per_sample = f.profile.per_sample_stats(&f.path, layer, head)?;
    Ok(HeadSamples::new(per_sample)?)
}

/// Searches every head of the profiles' model (rayon over heads).
pub fn calibrate(
    mut calib: Vec<ProfileFile>,
    mut heldout: Vec<ProfileFile>,
    goal: Goal,
    tool: &str,
) -> Result<(Calibration, Vec<ProfileFile>, Vec<ProfileFile>), Error> {
    check_profiles(&mut calib, &mut heldout, tool)?;
    if goal.tail_recall.is_some() && calib[0].profile.meta.tail_q == 0 {
        return Err(bad(
            &calib[0].path,
            "tail_q",
            "0: the profile kept no statistics of the last rows, which a tail recall target needs \
             (profile again with --tail-q)",
        ));
    }
    let model = calib[0].profile.meta.model.clone();
    let pairs: Vec<(usize, usize)> = (0..model.layers as usize)
        .flat_map(|l| (0..model.query_heads as usize).map(move |h| (l, h)))
        .collect();
    let heldout_by_len: BTreeMap<u64, &ProfileFile> = heldout
        .iter()
        .map(|f| (f.profile.meta.seq_len, f))
        .collect();
    // Every candidate of every head scored at every length, with MInference's choices.
    let searched = pairs
        .par_iter()
        .map(|&(layer, head)| {
            let per_len: Vec<HeadSamples> = calib
                .iter()
                .map(|f| head_samples(f, layer, head))
                .collect::<Result<_, _>>()?;
            Ok(Searched {
                layer,
                head,
                scored: per_len
                    .iter()
                    .map(|hs| {
                        // under a local floor, candidates cheaper than its A-shape are not offered
                        let floor = goal.local_floor.map_or(0.0, |l| hs.floor_density(l));
                        hs.candidates()
                            .into_iter()
                            .map(|c| hs.score(c))
                            .filter(|s| s.density >= floor - 1e-12)
                            .collect()
                    })
                    .collect(),
                minference: per_len.iter().map(minference::choose).collect(),
                minference_default: per_len.iter().map(minference::single_best).collect(),
            })
        })
        .collect::<Result<Vec<Searched>, Error>>()?;
    // A FLOPs budget becomes the highest common target whose plan fits it.
    let goal = match goal.flops_budget {
        Some(budget) => Goal {
            target_recall: target_within_budget(&searched, &goal, budget)?,
            ..goal
        },
        None => goal,
    };
    let heads = searched
        .into_par_iter()
        .map(|s| {
            let chosen = choose_across_lengths(&s.scored, &goal);
            let mut held: Vec<Scored> = Vec::new();
            for (f, c) in calib.iter().zip(&chosen) {
                if let Some(h) = heldout_by_len.get(&f.profile.meta.seq_len) {
                    held.push(head_samples(h, s.layer, s.head)?.score(c.candidate));
                }
            }
            let any = !heldout_by_len.is_empty();
            let heldout = any.then(|| held.iter().map(|s| s.recall).collect());
            let heldout_tail = if any {
                held.iter().map(|s| s.tail).collect::<Option<Vec<f64>>>()
            } else {
                None
            };
            Ok(HeadResult {
                layer: s.layer,
                head: s.head,
                chosen,
                heldout,
                heldout_tail,
                minference: s.minference,
                minference_default: s.minference_default,
            })
        })
        .collect::<Result<Vec<HeadResult>, Error>>()?;
    let seq_lens = calib.iter().map(|f| f.profile.meta.seq_len).collect();
    let dynamic = calib[0].profile.meta.dynamic.clone();
    Ok((
        Calibration {
            heads,
            seq_lens,
            goal,
            dynamic,
        },
        calib,
        heldout,
    ))
}

/// One head's scored candidates (`[length][candidate]`) before the choice.
struct Searched {
    layer: usize,
    head: usize,
    scored: Vec<Vec<Scored>>,
    minference: Vec<MInferenceChoice>,
    minference_default: Vec<Scored>,
}

/// The highest recall target (same objective for every head) whose plan computes at most `budget`
/// of dense cells, averaged over heads and lengths: the budget goes where it buys recall, instead
/// of capping every head at the same density (a head that needs 60% of its cells would get 40% and
/// lose recall, while one content with 5% would leave its share unused). A plan's density only grows
/// with its target, so bisection finds it. An error when even the cheapest plan exceeds the budget.
fn target_within_budget(searched: &[Searched], goal: &Goal, budget: f64) -> Result<f64, Error> {
    let density_at = |target: f64| {
        let g = Goal {
            target_recall: target,
            ..*goal
        };
        mean(searched.iter().map(|s| {
            mean(
                choose_across_lengths(&s.scored, &g)
                    .iter()
                    .map(|c| c.density),
            )
        }))
    };
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    if density_at(hi) <= budget {
        return Ok(hi);
    }
    let cheapest = density_at(lo);
    if cheapest > budget {
        let floor = goal.local_floor.map_or(String::new(), |l| {
            format!(" under the local floor of {l} tokens (lower or turn off --local-floor)")
        });
        return Err(Error::Usage(format!(
            "--flops-budget {budget}: the cheapest plan computes {cheapest:.4} of dense attention \
             cells{floor}"
        )));
    }
    for _ in 0..40 {
        let mid = 0.5 * (lo + hi);
        if density_at(mid) <= budget {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// One family for all lengths (a plan entry has one pattern), with the cheapest budgets per length:
/// the family with the lowest mean density among those that reach the goal at every length.
fn choose_across_lengths(scored: &[Vec<Scored>], goal: &Goal) -> Vec<Scored> {
    if let [only] = scored {
        return vec![choose(only, goal)];
    }
    let per_len: Vec<Vec<Scored>> = scored.iter().map(|s| best_per_family(s, goal)).collect();
    let mut families: Vec<usize> = per_len
        .iter()
        .flatten()
        .map(|s| s.candidate.family())
        .collect();
    families.sort_unstable();
    families.dedup();
    let mut best: Option<(f64, usize, Vec<Scored>)> = None;
    for family in families {
        let picks: Option<Vec<Scored>> = per_len
            .iter()
            .map(|b| b.iter().find(|s| s.candidate.family() == family).copied())
            .collect();
        if let Some(picks) = picks {
            let cost = mean(picks.iter().map(|s| s.density));
            if best.as_ref().is_none_or(|(c, _, _)| cost < *c) {
                best = Some((cost, family, picks));
            }
        }
    }
    match best {
        Some((_, _, picks)) => picks,
        // No family fits at every length (a FLOPs budget below what any family reaches everywhere).
        None => scored.iter().map(|_| Scored::dense()).collect(),
    }
}

/// Makes every head whose held-out recall misses the target by more than `tolerance` dense (recall 1
/// everywhere, held-out included), and returns those heads as they were before.
///
/// A plan written after this meets the target on held-out data for every head: the heads the
/// calibration samples misled cost their dense cells instead of their recall.
pub fn fall_back_to_dense(cal: &mut Calibration, tolerance: f64) -> Vec<HeadResult> {
    let goal = cal.goal;
    let dense = Scored::dense();
    let mut failed = Vec::new();
    for h in &mut cal.heads {
        if h.misses(&goal, tolerance) {
            failed.push(h.clone());
            h.chosen.iter_mut().for_each(|s| *s = dense);
            for v in [&mut h.heldout, &mut h.heldout_tail].into_iter().flatten() {
                v.iter_mut().for_each(|x| *x = 1.0);
            }
        }
    }
    failed
}
