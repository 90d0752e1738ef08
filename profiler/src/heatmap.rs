//! Heat maps a person can look at: one PNG per head of block-pooled attention, log scale.
//!
//! Pixel `(x = key block, y = query block)` shows the mean mass a row of the query block puts on the
//! key block, on a log10 scale from 1e-6 (dark) to 1 (bright), through a perceptual dark-blue → red →
//! yellow ramp; cells above the causal diagonal are mid-grey. Each block is drawn as a square of
//! `scale` pixels so short sequences stay visible.

use std::path::Path;

use crate::error::{Error, Result};

/// Lowest mass shown; anything smaller is drawn as the darkest colour.
const FLOOR: f64 = 1e-6;

/// Colour anchors of the ramp, from 0 (dark) to 1 (bright).
const RAMP: [[f64; 3]; 5] = [
    [0.0, 0.0, 0.02],
    [0.2, 0.05, 0.45],
    [0.75, 0.15, 0.35],
    [0.98, 0.55, 0.05],
    [0.99, 0.98, 0.6],
];

fn colour(t: f64) -> [u8; 3] {
    let t = t.clamp(0.0, 1.0) * (RAMP.len() - 1) as f64;
    let i = (t.floor() as usize).min(RAMP.len() - 2);
    let f = t - i as f64;
    let mut rgb = [0u8; 3];
    for (c, out) in rgb.iter_mut().enumerate() {
        let v = RAMP[i][c] * (1.0 - f) + RAMP[i + 1][c] * f;
        *out = (v * 255.0).round() as u8;
    }
    rgb
}

/// Renders `heat[qb][kb]` (rows of causal key blocks, each row's mass per row) as RGB pixels.
pub fn render(heat: &[Vec<f64>], scale: usize) -> (usize, usize, Vec<u8>) {
    let rows = heat.len();
    let cols = heat.iter().map(Vec::len).max().unwrap_or(0);
    let (w, h) = (cols * scale, rows * scale);
    let mut pixels = vec![0u8; w * h * 3];
    let lo = FLOOR.log10();
    for (qb, row) in heat.iter().enumerate() {
        for kb in 0..cols {
            let rgb = match row.get(kb) {
                Some(&m) => colour((m.max(FLOOR).log10() - lo) / -lo),
                None => [128, 128, 128],
            };
            for dy in 0..scale {
                let y = qb * scale + dy;
                for dx in 0..scale {
                    let at = (y * w + kb * scale + dx) * 3;
                    pixels[at..at + 3].copy_from_slice(&rgb);
                }
            }
        }
    }
    (w, h, pixels)
}

/// Writes the heat map as a PNG, atomically.
pub fn write_png(path: &Path, heat: &[Vec<f64>]) -> Result<()> {
    let blocks = heat.len().max(1);
    let scale = (512 / blocks).clamp(1, 16);
    let (w, h, pixels) = render(heat, scale);
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, w.max(1) as u32, h.max(1) as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let err = |e: png::EncodingError| Error::Profile(format!("{}: PNG: {e}", path.display()));
        let mut writer = enc.write_header().map_err(err)?;
        if w == 0 || h == 0 {
            writer.write_image_data(&[0, 0, 0]).map_err(err)?;
        } else {
            writer.write_image_data(&pixels).map_err(err)?;
        }
    }
    schemas::io::write_atomic(path, &bytes)?;
    Ok(())
}
