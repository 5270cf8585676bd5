//! Synthetic scenes for training and evaluating the demo vision-language model.
//!
//! A scene is a small image with a few coloured shapes on a plain-looking background and,
//! sometimes, one short uppercase word. [`generate_scene`] is a pure function of the
//! [`SceneConfig`] and a `u64` seed (its own SplitMix64 generator, no global state), so
//! the same seed always gives the same pixels and the same truth.
//!
//! # Truth
//!
//! Each scene draws 1..=`max_pairs` distinct (colour, shape) pairs, each with a count of
//! 1..=`max_count`, at most `max_objects` objects in all. Objects never overlap and stay
//! inside the image; when an object cannot be placed it is dropped, and [`Scene::objects`]
//! holds exactly what was drawn. With probability `word_prob` one word of [`WORDS`] is written
//! (5×7 bitmap font, 3–4 px per font pixel, black on light backgrounds and white on dark ones)
//! in a free area.
//!
//! # Caption grammar
//!
//! [`Scene::caption`] is canonical (the frozen language model learns to emit exactly it):
//!
//! * one group per distinct (colour, shape), ordered by [`Shape::ALL`] order, then by
//!   [`Colour::ALL`] order;
//! * a group is `"<count> <colour> <shape>"`: the count as an English word (`one`, `two`,
//!   `three`, …), the colour's [`Colour::name`], the shape's [`Shape::name`] when the count is
//!   one and [`Shape::plural`] otherwise;
//! * one group is followed by `"."`; two by `"A and B."`; more by `"A, B and C."` (no serial
//!   comma);
//! * when a word is written, `" The word \"CAT\" is written."` follows.
//!
//! For example `two red circles, one blue square and three green triangles.` or
//! `one yellow star. The word "MOON" is written.`
//!
//! # Seeds
//!
//! Training uses seeds below [`HELDOUT_SEED_BASE`]; evaluation uses
//! `HELDOUT_SEED_BASE + i`, so the two sets never share a scene.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::font;

/// Seeds at or above this value are held out: training draws seeds below it, evaluation uses
/// `HELDOUT_SEED_BASE + i` for scene `i`.
pub const HELDOUT_SEED_BASE: u64 = 1 << 40;

/// The words a scene may show (no colour or shape names among them).
pub const WORDS: [&str; 12] = [
    "CAT", "DOG", "SUN", "SKY", "BOX", "TREE", "FISH", "STOP", "MILK", "BIRD", "MOON", "HAT",
];

/// Number of (colour, shape) classes: `Shape::ALL.len() * Colour::ALL.len()`.
pub const NUM_PAIR_CLASSES: usize = 24;

/// Object colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
}

impl Colour {
    /// All colours, in caption order.
    pub const ALL: [Colour; 6] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Purple,
        Colour::Orange,
    ];

    /// Lowercase English name.
    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
        }
    }

    /// Position in [`Colour::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The colour named `name` (case-insensitive).
    pub fn from_name(name: &str) -> Option<Colour> {
        Colour::ALL
            .into_iter()
            .find(|c| c.name().eq_ignore_ascii_case(name))
    }

    /// The nominal (un-jittered) RGB of the colour; drawn objects differ by at most ±12 per
    /// channel.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 30, 30],
            Colour::Green => [30, 170, 50],
            Colour::Blue => [30, 70, 225],
            Colour::Yellow => [240, 210, 20],
            Colour::Purple => [140, 40, 190],
            Colour::Orange => [250, 130, 15],
        }
    }
}

/// Object shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
}

impl Shape {
    /// All shapes, in caption order.
    pub const ALL: [Shape; 4] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Star];

    /// Lowercase singular name.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
        }
    }

    /// Lowercase plural name.
    pub fn plural(self) -> &'static str {
        match self {
            Shape::Circle => "circles",
            Shape::Square => "squares",
            Shape::Triangle => "triangles",
            Shape::Star => "stars",
        }
    }

    /// Position in [`Shape::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The shape named `name`, singular or plural (case-insensitive).
    pub fn from_name(name: &str) -> Option<Shape> {
        Shape::ALL
            .into_iter()
            .find(|s| s.name().eq_ignore_ascii_case(name) || s.plural().eq_ignore_ascii_case(name))
    }

    /// Radius of the circle around the shape's centre that holds the whole shape, as a
    /// multiple of [`SceneObject::size`].
    fn extent(self) -> f32 {
        match self {
            Shape::Circle => 1.0,
            Shape::Square => SQUARE_HALF * std::f32::consts::SQRT_2,
            // Vertices at (±TRI_HALF_BASE, TRI_HALF_HEIGHT) and (0, -TRI_HALF_HEIGHT).
            Shape::Triangle => {
                (TRI_HALF_BASE * TRI_HALF_BASE + TRI_HALF_HEIGHT * TRI_HALF_HEIGHT).sqrt()
            }
            Shape::Star => STAR_OUTER,
        }
    }
}

/// Square half-side as a multiple of the object size.
const SQUARE_HALF: f32 = 0.9;
/// Equilateral triangle half-base as a multiple of the object size.
const TRI_HALF_BASE: f32 = 0.98;
/// Triangle half-height (its bounding box is centred on the object centre).
const TRI_HALF_HEIGHT: f32 = TRI_HALF_BASE * 0.866_025_4;
/// Star outer radius as a multiple of the object size.
const STAR_OUTER: f32 = 1.2;
/// Star inner radius as a fraction of the outer radius.
const STAR_INNER_RATIO: f32 = 0.48;

/// How scenes are drawn.
#[derive(Clone, Debug, PartialEq)]
pub struct SceneConfig {
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Most distinct (colour, shape) pairs per scene (default 3).
    pub max_pairs: usize,
    /// Most objects per pair (default 3).
    pub max_count: usize,
    /// Most objects per scene (default 6).
    pub max_objects: usize,
    /// Probability that a scene shows a word (default 0.3).
    pub word_prob: f32,
    /// Smallest object size (circle radius, square half-side…) as a fraction of the shorter
    /// image side (default 0.07).
    pub min_size_frac: f32,
    /// Largest object size as a fraction of the shorter image side (default 0.13).
    pub max_size_frac: f32,
}

impl Default for SceneConfig {
    fn default() -> Self {
        SceneConfig {
            width: 256,
            height: 256,
            max_pairs: 3,
            max_count: 3,
            max_objects: 6,
            word_prob: 0.3,
            min_size_frac: 0.07,
            max_size_frac: 0.13,
        }
    }
}

impl SceneConfig {
    /// The default configuration with an aspect ratio chosen by `seed`: 256×256, 320×240 or
    /// 240×320 (deterministic; independent of the scene drawn with the same seed).
    pub fn varied(seed: u64) -> SceneConfig {
        let mut rng = SplitMix64::new(seed ^ 0xA5A5_5A5A_C3C3_3C3C);
        let (width, height) = [(256, 256), (320, 240), (240, 320)][rng.below(3)];
        SceneConfig {
            width,
            height,
            ..SceneConfig::default()
        }
    }
}

/// One drawn object.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SceneObject {
    pub colour: Colour,
    pub shape: Shape,
    /// Centre, in pixels (x to the right).
    pub cx: f32,
    /// Centre, in pixels (y downwards).
    pub cy: f32,
    /// Circle radius / square half-side / comparable scale for triangles and stars, in pixels.
    pub size: f32,
    /// Rotation of the drawn shape, in radians (0 for circles).
    pub angle: f32,
}

impl SceneObject {
    /// Whether the point (x, y), in source pixels, lies inside the drawn shape.
    pub fn contains(&self, x: f32, y: f32) -> bool {
        let ext = self.shape.extent() * self.size;
        if (x - self.cx).abs() > ext || (y - self.cy).abs() > ext {
            return false;
        }
        Geom::new(self.shape, self.cx, self.cy, self.size, self.angle).inside(x, y)
    }
}

/// A generated scene: the image and the truth it was drawn from.
#[derive(Clone, Debug, PartialEq)]
pub struct Scene {
    pub image: image::RgbImage,
    pub objects: Vec<SceneObject>,
    /// The word written in the image, one of [`WORDS`].
    pub word: Option<String>,
}

impl Scene {
    /// Count per distinct (colour, shape), in caption order (shapes in [`Shape::ALL`] order,
    /// then colours in [`Colour::ALL`] order).
    pub fn pair_counts(&self) -> Vec<(Colour, Shape, u32)> {
        let mut counts = [0u32; NUM_PAIR_CLASSES];
        for o in &self.objects {
            counts[pair_class(o.colour, o.shape)] += 1;
        }
        let mut out = Vec::new();
        for shape in Shape::ALL {
            for colour in Colour::ALL {
                let n = counts[pair_class(colour, shape)];
                if n > 0 {
                    out.push((colour, shape, n));
                }
            }
        }
        out
    }

    /// The canonical caption (see the module docs for the grammar).
    pub fn caption(&self) -> String {
        format_caption(&self.pair_counts(), self.word.as_deref())
    }

    /// Count targets for an auxiliary classifier: [`NUM_PAIR_CLASSES`] values, index
    /// `shape.index() * 6 + colour.index()`, 0 for absent pairs.
    pub fn count_targets(&self) -> Vec<i64> {
        let mut t = vec![0i64; NUM_PAIR_CLASSES];
        for o in &self.objects {
            t[pair_class(o.colour, o.shape)] += 1;
        }
        t
    }

    /// 0 when no word is written, otherwise the word's index in [`WORDS`] plus one.
    pub fn word_index(&self) -> i64 {
        self.word
            .as_deref()
            .and_then(|w| WORDS.iter().position(|x| *x == w))
            .map_or(0, |i| i as i64 + 1)
    }
}

/// Class index of a (colour, shape) pair: `shape.index() * 6 + colour.index()`.
pub fn pair_class(colour: Colour, shape: Shape) -> usize {
    shape.index() * Colour::ALL.len() + colour.index()
}

/// A count as an English word (`one`…`twelve`), digits beyond.
pub fn count_word(n: u32) -> String {
    const NAMES: [&str; 13] = [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve",
    ];
    NAMES
        .get(n as usize)
        .map_or_else(|| n.to_string(), |s| s.to_string())
}

/// Formats groups (in the order given) and an optional word with the caption grammar of the
/// module docs. [`Scene::caption`] passes [`Scene::pair_counts`]. With no groups the caption is
/// only the word sentence (or empty).
pub fn format_caption(pairs: &[(Colour, Shape, u32)], word: Option<&str>) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .map(|&(colour, shape, n)| {
            let noun = if n == 1 { shape.name() } else { shape.plural() };
            format!("{} {} {}", count_word(n), colour.name(), noun)
        })
        .collect();
    let mut out = match parts.len() {
        0 => String::new(),
        1 => format!("{}.", parts[0]),
        k => format!("{} and {}.", parts[..k - 1].join(", "), parts[k - 1]),
    };
    if let Some(w) = word {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&format!("The word \"{w}\" is written."));
    }
    out
}

/// SplitMix64: small, fast, good enough for scene sampling.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    /// Starts from `state` as is (no decorrelating first draw).
    pub(crate) fn from_state(state: u64) -> Self {
        SplitMix64(state)
    }

    /// Uniform in [0, 1) with 53 bits.
    pub(crate) fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn new(seed: u64) -> Self {
        let mut r = SplitMix64(seed);
        // Decorrelate nearby seeds before the first draw.
        r.0 = r.next_u64();
        r
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    fn range_f32(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.f32()
    }

    /// Uniform in 0..n (n ≥ 1).
    fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }

    /// Uniform in lo..=hi.
    fn range_incl(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    fn chance(&mut self, p: f32) -> bool {
        self.f32() < p
    }
}

/// HSV (h in degrees, s and v in 0..1) to RGB in 0..255.
fn hsv(h: f32, s: f32, v: f32) -> [f32; 3] {
    let h = h.rem_euclid(360.0) / 60.0;
    let c = v * s;
    let x = c * (1.0 - (h % 2.0 - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [(r + m) * 255.0, (g + m) * 255.0, (b + m) * 255.0]
}

/// One background colour: grey, beige or a low-saturation pastel, light or dark.
fn background_colour(rng: &mut SplitMix64, light: bool) -> [f32; 3] {
    let v = if light {
        rng.range_f32(0.72, 0.96)
    } else {
        rng.range_f32(0.08, 0.32)
    };
    let (h, s) = match rng.below(3) {
        0 => (rng.range_f32(0.0, 360.0), rng.range_f32(0.0, 0.04)),
        1 => (rng.range_f32(32.0, 45.0), rng.range_f32(0.10, 0.20)),
        _ => (rng.range_f32(0.0, 360.0), rng.range_f32(0.05, 0.18)),
    };
    hsv(h, s, v)
}

#[derive(Clone, Copy)]
enum Gradient {
    Solid,
    Horizontal,
    Vertical,
    Diagonal,
    AntiDiagonal,
}

/// Fills `buf` (RGB f32, row-major) with a solid colour or a 2-colour gradient.
fn fill_background(buf: &mut [f32], w: usize, h: usize, rng: &mut SplitMix64, light: bool) {
    let c0 = background_colour(rng, light);
    let c1 = background_colour(rng, light);
    let grad = match rng.below(5) {
        0 => Gradient::Solid,
        1 => Gradient::Horizontal,
        2 => Gradient::Vertical,
        3 => Gradient::Diagonal,
        _ => Gradient::AntiDiagonal,
    };
    let wx = 1.0 / (w.max(2) - 1) as f32;
    let hy = 1.0 / (h.max(2) - 1) as f32;
    for y in 0..h {
        let row = &mut buf[y * w * 3..(y + 1) * w * 3];
        for x in 0..w {
            let t = match grad {
                Gradient::Solid => 0.0,
                Gradient::Horizontal => x as f32 * wx,
                Gradient::Vertical => y as f32 * hy,
                Gradient::Diagonal => 0.5 * (x as f32 * wx + y as f32 * hy),
                Gradient::AntiDiagonal => 0.5 * (1.0 - x as f32 * wx + y as f32 * hy),
            };
            let p = &mut row[x * 3..x * 3 + 3];
            for c in 0..3 {
                p[c] = c0[c] + (c1[c] - c0[c]) * t;
            }
        }
    }
}

/// The geometry of a drawn object, in pixel coordinates.
enum Geom {
    Circle { cx: f32, cy: f32, r: f32 },
    Polygon(Vec<[f32; 2]>),
}

impl Geom {
    fn new(shape: Shape, cx: f32, cy: f32, size: f32, angle: f32) -> Geom {
        let (sin, cos) = angle.sin_cos();
        let place = |pts: &[[f32; 2]]| -> Geom {
            Geom::Polygon(
                pts.iter()
                    .map(|&[x, y]| {
                        let (x, y) = (x * size, y * size);
                        [cx + x * cos - y * sin, cy + x * sin + y * cos]
                    })
                    .collect(),
            )
        };
        match shape {
            Shape::Circle => Geom::Circle { cx, cy, r: size },
            Shape::Square => place(&[
                [-SQUARE_HALF, -SQUARE_HALF],
                [SQUARE_HALF, -SQUARE_HALF],
                [SQUARE_HALF, SQUARE_HALF],
                [-SQUARE_HALF, SQUARE_HALF],
            ]),
            Shape::Triangle => place(&[
                [0.0, -TRI_HALF_HEIGHT],
                [TRI_HALF_BASE, TRI_HALF_HEIGHT],
                [-TRI_HALF_BASE, TRI_HALF_HEIGHT],
            ]),
            Shape::Star => {
                let pts: Vec<[f32; 2]> = (0..10)
                    .map(|i| {
                        let r = if i % 2 == 0 {
                            STAR_OUTER
                        } else {
                            STAR_OUTER * STAR_INNER_RATIO
                        };
                        let a =
                            -std::f32::consts::FRAC_PI_2 + i as f32 * std::f32::consts::PI / 5.0;
                        [r * a.cos(), r * a.sin()]
                    })
                    .collect();
                place(&pts)
            }
        }
    }

    fn inside(&self, x: f32, y: f32) -> bool {
        match self {
            Geom::Circle { cx, cy, r } => (x - cx) * (x - cx) + (y - cy) * (y - cy) <= r * r,
            Geom::Polygon(pts) => {
                let mut inside = false;
                let mut j = pts.len() - 1;
                for i in 0..pts.len() {
                    let [xi, yi] = pts[i];
                    let [xj, yj] = pts[j];
                    if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
                        inside = !inside;
                    }
                    j = i;
                }
                inside
            }
        }
    }

    /// Whether the boundary passes within `d` pixels of (x, y).
    fn near_edge(&self, x: f32, y: f32, d: f32) -> bool {
        match self {
            Geom::Circle { cx, cy, r } => {
                (((x - cx) * (x - cx) + (y - cy) * (y - cy)).sqrt() - r).abs() <= d
            }
            Geom::Polygon(pts) => {
                let d2 = d * d;
                let mut j = pts.len() - 1;
                for i in 0..pts.len() {
                    let [ax, ay] = pts[j];
                    let [bx, by] = pts[i];
                    let (ex, ey) = (bx - ax, by - ay);
                    let t = (((x - ax) * ex + (y - ay) * ey) / (ex * ex + ey * ey)).clamp(0.0, 1.0);
                    let (dx, dy) = (x - ax - t * ex, y - ay - t * ey);
                    if dx * dx + dy * dy <= d2 {
                        return true;
                    }
                    j = i;
                }
                false
            }
        }
    }

    /// Fraction of the pixel with top-left corner (x, y) covered (4×4 supersampling near the
    /// boundary).
    fn coverage(&self, x: usize, y: usize) -> f32 {
        let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
        if !self.near_edge(px, py, 0.75) {
            return if self.inside(px, py) { 1.0 } else { 0.0 };
        }
        let mut hits = 0u32;
        for sy in 0..4 {
            for sx in 0..4 {
                let (qx, qy) = (
                    x as f32 + (sx as f32 + 0.5) * 0.25,
                    y as f32 + (sy as f32 + 0.5) * 0.25,
                );
                hits += u32::from(self.inside(qx, qy));
            }
        }
        hits as f32 / 16.0
    }
}

/// Blends `geom` filled with `rgb` into `buf`, only over the given bounding box.
fn draw_geom(buf: &mut [f32], w: usize, h: usize, geom: &Geom, rgb: [f32; 3], bbox: [f32; 4]) {
    let x0 = (bbox[0].floor().max(0.0)) as usize;
    let y0 = (bbox[1].floor().max(0.0)) as usize;
    let x1 = (bbox[2].ceil().max(0.0) as usize).min(w);
    let y1 = (bbox[3].ceil().max(0.0) as usize).min(h);
    for y in y0..y1 {
        for x in x0..x1 {
            let a = geom.coverage(x, y);
            if a > 0.0 {
                let p = &mut buf[(y * w + x) * 3..(y * w + x) * 3 + 3];
                for c in 0..3 {
                    p[c] += (rgb[c] - p[c]) * a;
                }
            }
        }
    }
}

/// Writes `text` with the 5×7 font, `scale` pixels per font pixel, top-left at (x, y).
fn draw_text(
    buf: &mut [f32],
    w: usize,
    h: usize,
    text: &str,
    pos: (usize, usize),
    scale: usize,
    rgb: [f32; 3],
) {
    for (i, ch) in text.chars().enumerate() {
        let Some(rows) = font::glyph(ch) else {
            continue;
        };
        let gx = pos.0 + i * (font::GLYPH_W + 1) * scale;
        for row in 0..font::GLYPH_H {
            for col in 0..font::GLYPH_W {
                if !font::is_set(&rows, col, row) {
                    continue;
                }
                for y in pos.1 + row * scale..(pos.1 + (row + 1) * scale).min(h) {
                    for x in gx + col * scale..(gx + (col + 1) * scale).min(w) {
                        buf[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&rgb);
                    }
                }
            }
        }
    }
}

/// Size in pixels of `text` drawn at `scale` (1 font pixel between letters).
fn text_size(text: &str, scale: usize) -> (usize, usize) {
    let n = text.chars().count();
    (
        (n * (font::GLYPH_W + 1)).saturating_sub(1) * scale,
        font::GLYPH_H * scale,
    )
}

/// Distance from a point to an axis-aligned rectangle [x0, y0, x1, y1] (0 inside).
fn rect_distance(x: f32, y: f32, r: [f32; 4]) -> f32 {
    let dx = (r[0] - x).max(x - r[2]).max(0.0);
    let dy = (r[1] - y).max(y - r[3]).max(0.0);
    (dx * dx + dy * dy).sqrt()
}

/// Draws the scene for `seed` (see the module docs). Deterministic: the same `cfg` and `seed`
/// give the same image and truth.
pub fn generate_scene(cfg: &SceneConfig, seed: u64) -> Scene {
    let mut rng = SplitMix64::new(seed);
    let (w, h) = (cfg.width.max(1) as usize, cfg.height.max(1) as usize);
    let short = w.min(h) as f32;
    let margin = (0.03 * short).max(3.0);
    let edge = 2.0;

    // Background.
    let light = rng.chance(0.5);
    let mut buf = vec![0f32; w * h * 3];
    fill_background(&mut buf, w, h, &mut rng, light);

    // Truth to aim for: distinct pairs and their counts.
    let max_objects = cfg.max_objects.max(1);
    let max_pairs = cfg.max_pairs.clamp(1, NUM_PAIR_CLASSES).min(max_objects);
    let n_pairs = rng.range_incl(1, max_pairs);
    let mut classes: Vec<usize> = (0..NUM_PAIR_CLASSES).collect();
    for i in 0..n_pairs {
        let j = i + rng.below(NUM_PAIR_CLASSES - i);
        classes.swap(i, j);
    }
    let mut counts: Vec<usize> = (0..n_pairs)
        .map(|_| rng.range_incl(1, cfg.max_count.max(1)))
        .collect();
    while counts.iter().sum::<usize>() > max_objects {
        let over: Vec<usize> = (0..n_pairs).filter(|&i| counts[i] > 1).collect();
        counts[over[rng.below(over.len())]] -= 1;
    }
    let mut todo: Vec<(Colour, Shape)> = Vec::new();
    for (i, &n) in counts.iter().enumerate() {
        let class = classes[i];
        let pair = (
            Colour::ALL[class % Colour::ALL.len()],
            Shape::ALL[class / Colour::ALL.len()],
        );
        for _ in 0..n {
            todo.push(pair);
        }
    }
    for i in (1..todo.len()).rev() {
        todo.swap(i, rng.below(i + 1));
    }

    // The word's place is chosen first (objects keep clear of it).
    let mut word: Option<(&'static str, usize, [usize; 2])> = None;
    if rng.chance(cfg.word_prob) {
        let text = WORDS[rng.below(WORDS.len())];
        let first = rng.range_incl(3, 4);
        for scale in [first, 3] {
            let (tw, th) = text_size(text, scale);
            let pad = 4;
            if tw + 2 * pad <= w && th + 2 * pad <= h {
                let x = rng.range_incl(pad, w - tw - pad);
                let y = rng.range_incl(pad, h - th - pad);
                word = Some((text, scale, [x, y]));
                break;
            }
        }
    }
    let word_rect = word.map(|(text, scale, [x, y])| {
        let (tw, th) = text_size(text, scale);
        [x as f32, y as f32, (x + tw) as f32, (y + th) as f32]
    });

    // Objects: rejection sampling, then smallest size, then drop.
    let (lo_frac, hi_frac) = (
        cfg.min_size_frac.min(cfg.max_size_frac),
        cfg.max_size_frac.max(cfg.min_size_frac),
    );
    let mut objects: Vec<SceneObject> = Vec::with_capacity(todo.len());
    for (colour, shape) in todo {
        for attempt in 0..100 {
            let frac = if attempt < 60 {
                rng.range_f32(lo_frac, hi_frac)
            } else {
                lo_frac
            };
            let size = frac * short;
            let ext = shape.extent() * size;
            let (lo_x, hi_x) = (ext + edge, w as f32 - ext - edge);
            let (lo_y, hi_y) = (ext + edge, h as f32 - ext - edge);
            if hi_x < lo_x || hi_y < lo_y {
                continue;
            }
            let cx = rng.range_f32(lo_x, hi_x);
            let cy = rng.range_f32(lo_y, hi_y);
            let clear_of_objects = objects.iter().all(|o| {
                let d = ((o.cx - cx).powi(2) + (o.cy - cy).powi(2)).sqrt();
                d > o.shape.extent() * o.size + ext + margin
            });
            let clear_of_word = match word_rect {
                Some(r) => rect_distance(cx, cy, r) > ext + margin,
                None => true,
            };
            if clear_of_objects && clear_of_word {
                objects.push(SceneObject {
                    colour,
                    shape,
                    cx,
                    cy,
                    size,
                    angle: 0.0,
                });
                break;
            }
        }
    }

    // Draw the objects.
    for o in &mut objects {
        let angle = match o.shape {
            Shape::Circle => 0.0,
            Shape::Square => rng.range_f32(-10.0, 10.0),
            Shape::Triangle => rng.range_f32(-6.0, 6.0),
            Shape::Star => rng.range_f32(-12.0, 12.0),
        }
        .to_radians();
        o.angle = angle;
        let base = o.colour.rgb();
        let rgb = base.map(|c| (c as f32 + rng.range_f32(-12.0, 12.0)).clamp(0.0, 255.0));
        let geom = Geom::new(o.shape, o.cx, o.cy, o.size, angle);
        let ext = o.shape.extent() * o.size + 1.0;
        draw_geom(
            &mut buf,
            w,
            h,
            &geom,
            rgb,
            [o.cx - ext, o.cy - ext, o.cx + ext, o.cy + ext],
        );
    }

    // Draw the word.
    if let Some((text, scale, [x, y])) = word {
        let v = if light {
            rng.range_f32(5.0, 35.0)
        } else {
            rng.range_f32(220.0, 250.0)
        };
        draw_text(&mut buf, w, h, text, (x, y), scale, [v, v, v]);
    }

    // Mild per-pixel noise (luminance plus a little per channel), then quantise.
    let amp_l = rng.range_f32(1.0, 6.0);
    let amp_c = rng.range_f32(0.0, 2.5);
    let mut noise = SplitMix64::new(rng.next_u64());
    let mut raw = vec![0u8; w * h * 3];
    for (p, q) in buf.chunks_exact(3).zip(raw.chunks_exact_mut(3)) {
        let r = noise.next_u64();
        let unit = |k: u32| ((r >> k) & 0xFFFF) as f32 * (2.0 / 65535.0) - 1.0;
        let l = unit(0) * amp_l;
        for c in 0..3 {
            q[c] = (p[c] + l + unit(16 * (c as u32 + 1)) * amp_c)
                .round()
                .clamp(0.0, 255.0) as u8;
        }
    }
    let image = image::RgbImage::from_raw(w as u32, h as u32, raw).expect("buffer size matches");

    Scene {
        image,
        objects,
        word: word.map(|(text, _, _)| text.to_string()),
    }
}

/// Writes `n` scenes (seeds `seed + i`) as `scene-{i:03}.png` into `dir` (created if missing)
/// with a `captions.jsonl` of `{"image": file name, "caption": ...}` lines. Returns each
/// image's path and caption. For the held-out set pass `seed = HELDOUT_SEED_BASE`.
pub fn write_scenes(
    dir: &Path,
    n: usize,
    seed: u64,
    cfg: &SceneConfig,
) -> std::io::Result<Vec<(PathBuf, String)>> {
    std::fs::create_dir_all(dir)?;
    let mut jsonl = std::io::BufWriter::new(std::fs::File::create(dir.join("captions.jsonl"))?);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let scene = generate_scene(cfg, seed.wrapping_add(i as u64));
        let name = format!("scene-{i:03}.png");
        let path = dir.join(&name);
        scene
            .image
            .save_with_format(&path, image::ImageFormat::Png)
            .map_err(std::io::Error::other)?;
        let caption = scene.caption();
        let line = serde_json::json!({ "image": name, "caption": caption });
        writeln!(jsonl, "{line}")?;
        out.push((path, caption));
    }
    jsonl.flush()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scene_is_deterministic_from_seed() {
        let cfg = SceneConfig::default();
        for seed in [0u64, 1, 42, HELDOUT_SEED_BASE + 7] {
            let a = generate_scene(&cfg, seed);
            let b = generate_scene(&cfg, seed);
            assert_eq!(a, b, "seed {seed}");
        }
        assert_ne!(generate_scene(&cfg, 1).image, generate_scene(&cfg, 2).image);
        assert_eq!(SceneConfig::varied(9), SceneConfig::varied(9));
    }

    #[test]
    fn scene_caption_format() {
        let pairs = [
            (Colour::Red, Shape::Circle, 2),
            (Colour::Blue, Shape::Square, 1),
            (Colour::Green, Shape::Triangle, 3),
        ];
        assert_eq!(
            format_caption(&pairs, None),
            "two red circles, one blue square and three green triangles."
        );
        assert_eq!(
            format_caption(&[(Colour::Yellow, Shape::Star, 1)], Some("CAT")),
            "one yellow star. The word \"CAT\" is written."
        );
        assert_eq!(
            format_caption(&pairs[..2], None),
            "two red circles and one blue square."
        );
    }

    #[test]
    fn scene_pair_counts_in_caption_order() {
        let obj = |colour, shape| SceneObject {
            colour,
            shape,
            cx: 0.0,
            cy: 0.0,
            size: 1.0,
            angle: 0.0,
        };
        let scene = Scene {
            image: image::RgbImage::new(1, 1),
            objects: vec![
                obj(Colour::Green, Shape::Triangle),
                obj(Colour::Blue, Shape::Square),
                obj(Colour::Red, Shape::Circle),
                obj(Colour::Green, Shape::Triangle),
                obj(Colour::Orange, Shape::Circle),
            ],
            word: Some("MOON".into()),
        };
        assert_eq!(
            scene.pair_counts(),
            vec![
                (Colour::Red, Shape::Circle, 1),
                (Colour::Orange, Shape::Circle, 1),
                (Colour::Blue, Shape::Square, 1),
                (Colour::Green, Shape::Triangle, 2),
            ]
        );
        assert_eq!(
            scene.caption(),
            "one red circle, one orange circle, one blue square and two green triangles. \
             The word \"MOON\" is written."
        );
        let t = scene.count_targets();
        assert_eq!(t.len(), NUM_PAIR_CLASSES);
        assert_eq!(t[2 * 6 + 1], 2);
        assert_eq!(t[5], 1);
        assert_eq!(t.iter().sum::<i64>(), 5);
        assert_eq!(scene.word_index(), 11);
    }

    #[test]
    fn scene_objects_in_bounds_without_overlap_and_counts_in_limits() {
        for seed in 0..500u64 {
            let cfg = SceneConfig::varied(seed);
            let s = generate_scene(&cfg, seed);
            assert_eq!(s.image.dimensions(), (cfg.width, cfg.height));
            let (w, h) = (cfg.width as f32, cfg.height as f32);
            let short = w.min(h);
            assert!(!s.objects.is_empty(), "seed {seed}");
            assert!(s.objects.len() <= cfg.max_objects);
            for (i, a) in s.objects.iter().enumerate() {
                let ext = a.shape.extent() * a.size;
                assert!(a.size >= cfg.min_size_frac * short - 1e-3);
                assert!(a.size <= cfg.max_size_frac * short + 1e-3);
                assert!(a.cx - ext >= 0.0 && a.cx + ext <= w, "seed {seed}: {a:?}");
                assert!(a.cy - ext >= 0.0 && a.cy + ext <= h, "seed {seed}: {a:?}");
                for b in &s.objects[i + 1..] {
                    let d = ((a.cx - b.cx).powi(2) + (a.cy - b.cy).powi(2)).sqrt();
                    assert!(d > ext + b.shape.extent() * b.size, "seed {seed}: overlap");
                }
            }
            let pairs = s.pair_counts();
            assert!(!pairs.is_empty() && pairs.len() <= cfg.max_pairs);
            for &(_, _, n) in &pairs {
                assert!(n >= 1 && n as usize <= cfg.max_count);
            }
            assert_eq!(
                s.count_targets().iter().sum::<i64>(),
                s.objects.len() as i64
            );
        }
    }

    #[test]
    fn scene_words_present_at_word_prob() {
        let cfg = SceneConfig::default();
        let n = 1000;
        let mut with_word = 0;
        for seed in 0..n {
            let s = generate_scene(&cfg, seed);
            if let Some(w) = &s.word {
                with_word += 1;
                assert!(WORDS.contains(&w.as_str()));
                assert!(s.word_index() >= 1);
                assert!(s
                    .caption()
                    .ends_with(&format!(" The word \"{w}\" is written.")));
            } else {
                assert_eq!(s.word_index(), 0);
            }
        }
        let rate = with_word as f32 / n as f32;
        assert!((rate - cfg.word_prob).abs() < 0.05, "rate {rate}");
        let none = SceneConfig {
            word_prob: 0.0,
            ..SceneConfig::default()
        };
        assert!((0..50).all(|seed| generate_scene(&none, seed).word.is_none()));
    }

    #[test]
    fn scene_font_covers_all_words() {
        for w in WORDS {
            assert!(w.chars().all(|c| font::glyph(c).is_some()), "{w}");
            for c in Colour::ALL {
                assert_ne!(w.to_ascii_lowercase(), c.name());
            }
            assert!(Shape::from_name(w).is_none());
        }
    }

    #[test]
    fn scene_renders_objects_in_their_colours() {
        for seed in 0..200u64 {
            let s = generate_scene(&SceneConfig::varied(seed), seed);
            for o in &s.objects {
                let p = s.image.get_pixel(o.cx as u32, o.cy as u32).0;
                let want = o.colour.rgb();
                for c in 0..3 {
                    let d = (p[c] as i32 - want[c] as i32).abs();
                    assert!(d <= 24, "seed {seed}: {o:?} drawn as {p:?}");
                }
            }
        }
    }

    #[test]
    fn scene_text_is_drawn() {
        let cfg = SceneConfig {
            word_prob: 1.0,
            ..SceneConfig::default()
        };
        let s = generate_scene(&cfg, 3);
        let w = s.word.clone().expect("word");
        let plain = generate_scene(
            &SceneConfig {
                word_prob: 0.0,
                ..cfg.clone()
            },
            3,
        );
        // Black or white text pixels exist somewhere.
        let extreme = s
            .image
            .pixels()
            .filter(|p| p.0.iter().all(|&c| c < 45) || p.0.iter().all(|&c| c > 210))
            .count();
        assert!(extreme > 7 * 9 * w.len(), "{w}: {extreme}");
        assert_eq!(plain.word, None);
    }

    #[test]
    fn scene_write_scenes_writes_pngs_and_jsonl() {
        let dir = std::env::temp_dir().join(format!("afm-scenes-test-{}", std::process::id()));
        let cfg = SceneConfig::default();
        let out = write_scenes(&dir, 3, HELDOUT_SEED_BASE, &cfg).unwrap();
        assert_eq!(out.len(), 3);
        let lines = std::fs::read_to_string(dir.join("captions.jsonl")).unwrap();
        let lines: Vec<&str> = lines.lines().collect();
        assert_eq!(lines.len(), 3);
        for (i, (path, caption)) in out.iter().enumerate() {
            assert_eq!(
                path.file_name().unwrap(),
                format!("scene-{i:03}.png").as_str()
            );
            let img = image::open(path).unwrap().to_rgb8();
            let scene = generate_scene(&cfg, HELDOUT_SEED_BASE + i as u64);
            assert_eq!(img, scene.image);
            assert_eq!(caption, &scene.caption());
            let v: serde_json::Value = serde_json::from_str(lines[i]).unwrap();
            assert_eq!(v["image"], format!("scene-{i:03}.png"));
            assert_eq!(v["caption"], caption.as_str());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn contains_matches_the_drawn_pixels() {
        // Pixels the geometry calls inside carry the object's colour (within the drawing's
        // colour jitter and noise); points beyond the extent are outside.
        let cfg = SceneConfig::default();
        for seed in 0..12 {
            let scene = generate_scene(&cfg, seed);
            for o in &scene.objects {
                assert!(o.contains(o.cx, o.cy), "seed {seed}: centre of {o:?}");
                let ext = o.shape.extent() * o.size;
                assert!(!o.contains(o.cx + ext + 1.0, o.cy));
                let rgb = o.colour.rgb();
                let (mut inside, mut close) = (0, 0);
                let (x0, x1) = ((o.cx - ext) as u32, (o.cx + ext) as u32);
                let (y0, y1) = ((o.cy - ext) as u32, (o.cy + ext) as u32);
                for y in y0..y1.min(scene.image.height()) {
                    for x in x0..x1.min(scene.image.width()) {
                        if o.contains(x as f32 + 0.5, y as f32 + 0.5) {
                            inside += 1;
                            let p = scene.image.get_pixel(x, y).0;
                            let d = (0..3)
                                .map(|c| (i32::from(p[c]) - i32::from(rgb[c])).abs())
                                .max()
                                .unwrap_or(0);
                            close += usize::from(d <= 40);
                        }
                    }
                }
                assert!(inside > 20, "seed {seed}: {inside} pixels inside {o:?}");
                assert!(
                    close as f64 >= 0.9 * inside as f64,
                    "seed {seed}: {close}/{inside} pixels of {o:?} have its colour"
                );
            }
        }
    }
}
