//! The loss-curve image: a small line chart written as a PNG with no dependencies (stored
//! deflate blocks: a larger file, ~0.8 MB, for no codec in the tree). Train loss in blue, eval
//! loss in red, axis ticks labelled with a 3×5 pixel font.

use std::path::Path;

use crate::{Error, Result};

const W: usize = 640;
const H: usize = 400;
const LEFT: usize = 56;
const RIGHT: usize = 16;
const TOP: usize = 16;
const BOTTOM: usize = 36;

struct Canvas {
    px: Vec<[u8; 3]>,
}

impl Canvas {
    fn new() -> Self {
        Canvas { px: vec![[255; 3]; W * H] }
    }
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            self.px[y as usize * W + x as usize] = c;
        }
    }
    /// Bresenham, two pixels thick.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            self.set(x, y + 1, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }
    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        for (ox, oy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            self.set(x + (i as i64) * 8 + col * 2 + ox, y + r as i64 * 2 + oy, c);
                        }
                    }
                }
            }
        }
    }
}

/// 3×5 glyphs, one row per entry, high bit on the left.
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 3, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        'a' => [0, 7, 1, 7, 7],
        'e' => [7, 5, 7, 4, 7],
        'i' => [2, 0, 2, 2, 2],
        'l' => [4, 4, 4, 4, 7],
        'n' => [0, 6, 5, 5, 5],
        'o' => [0, 7, 5, 5, 7],
        'p' => [7, 5, 7, 4, 4],
        'r' => [0, 7, 4, 4, 4],
        's' => [7, 4, 7, 1, 7],
        't' => [4, 7, 4, 4, 7],
        'v' => [0, 5, 5, 5, 2],
        _ => [0; 5],
    }
}

fn label(v: f32) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Draws train loss (blue) and eval loss (red) against the step and writes a PNG atomically.
pub fn loss_curve(path: &Path, train: &[(f32, f32)], eval: &[(f32, f32)]) -> Result<()> {
    let mut c = Canvas::new();
    let all: Vec<(f32, f32)> = train.iter().chain(eval).copied().filter(|p| p.1.is_finite()).collect();
    let (mut lo, mut hi) = all.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-6 {
        hi = lo + 1.0;
    }
    let pad = 0.05 * (hi - lo);
    let (lo, hi) = (lo - pad, hi + pad);
    let xmax = all.iter().map(|p| p.0).fold(1.0f32, f32::max);
    let (pw, ph) = ((W - LEFT - RIGHT) as f32, (H - TOP - BOTTOM) as f32);
    let to_px = |(x, y): (f32, f32)| -> (i64, i64) {
        ((LEFT as f32 + x / xmax * pw) as i64, (TOP as f32 + (hi - y) / (hi - lo) * ph) as i64)
    };
    let (grey, black) = ([220, 220, 220], [0, 0, 0]);
    for i in 0..=4 {
        let y = lo + (hi - lo) * i as f32 / 4.0;
        let (_, py) = to_px((0.0, y));
        c.line((LEFT as i64, py), ((W - RIGHT) as i64, py), grey);
        c.text(4, py - 5, &label(y), black);
        let x = xmax * i as f32 / 4.0;
        let (px, _) = to_px((x, lo));
        c.line((px, TOP as i64), (px, (H - BOTTOM) as i64), grey);
        c.text(px - 8, (H - BOTTOM + 6) as i64, &format!("{x:.0}"), black);
    }
    c.line((LEFT as i64, TOP as i64), (LEFT as i64, (H - BOTTOM) as i64), black);
    c.line((LEFT as i64, (H - BOTTOM) as i64), ((W - RIGHT) as i64, (H - BOTTOM) as i64), black);
    c.text((W / 2 - 16) as i64, (H - 14) as i64, "step", black);
    let (blue, red) = ([31, 119, 180], [214, 39, 40]);
    for (series, color) in [(train, blue), (eval, red)] {
        let pts: Vec<(i64, i64)> = series.iter().copied().filter(|p| p.1.is_finite()).map(to_px).collect();
        for w in pts.windows(2) {
            c.line(w[0], w[1], color);
        }
        for &(x, y) in &pts {
            if color == red || pts.len() == 1 {
                for d in -2..=2 {
                    c.line((x - 2, y + d), (x + 2, y + d), color);
                }
            }
        }
    }
    c.text((W - RIGHT - 150) as i64, TOP as i64 + 6, "train", blue);
    c.text((W - RIGHT - 70) as i64, TOP as i64 + 6, "eval", red);
    let tmp = path.with_extension("png.tmp");
    std::fs::write(&tmp, encode_png(&c)).and_then(|_| std::fs::rename(&tmp, path)).map_err(|e| Error::file(path, format!("cannot write: {e}")))
}

fn crc32(chunks: &[&[u8]]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for data in chunks {
        for &b in *data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
            }
        }
    }
    !crc
}

fn encode_png(c: &Canvas) -> Vec<u8> {
    // Scanlines, each led by filter type 0.
    let mut raw = Vec::with_capacity(H * (1 + 3 * W));
    for y in 0..H {
        raw.push(0);
        for x in 0..W {
            raw.extend_from_slice(&c.px[y * W + x]);
        }
    }
    // zlib stream of stored (uncompressed) deflate blocks.
    let mut z = vec![0x78, 0x01];
    let chunks: Vec<&[u8]> = raw.chunks(65535).collect();
    for (i, block) in chunks.iter().enumerate() {
        z.push(u8::from(i + 1 == chunks.len()));
        let len = block.len() as u16;
        z.extend_from_slice(&len.to_le_bytes());
        z.extend_from_slice(&(!len).to_le_bytes());
        z.extend_from_slice(block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in &raw {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());

    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        png.extend_from_slice(kind);
        png.extend_from_slice(data);
        png.extend_from_slice(&crc32(&[kind, data]).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(W as u32).to_be_bytes());
    ihdr.extend_from_slice(&(H as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter method, no interlace
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &z);
    chunk(b"IEND", &[]);
    png
}
