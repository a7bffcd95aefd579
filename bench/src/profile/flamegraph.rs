//! The flame graph of collapsed stacks as a standalone SVG: one rectangle per frame, its width
//! the frame's share of the samples, callers below callees, siblings in alphabetical order
//! as in flamegraph.pl. Each rectangle has a `<title>` tooltip with the name, the samples and
//! the share. Kernel frames are blue, user-space frames red to yellow.

use std::{collections::BTreeMap, fmt::Write as _};

use super::fold::{split_annotation, FoldedStacks, Space};
use crate::{report::thousands, svg::escape};

const WIDTH: f64 = 1200.0;
const MARGIN_X: f64 = 10.0;
/// Room for the title, subtitle and legend above the frames.
const HEADER_HEIGHT: f64 = 74.0;
const FOOTER_HEIGHT: f64 = 10.0;
const FRAME_HEIGHT: f64 = 16.0;
const FONT_SIZE: f64 = 11.0;
/// Average glyph width of the 11 px label font, used to cut labels to their frame.
const CHAR_WIDTH: f64 = 6.5;

/// Frames narrower than this are left out, with everything above them. They are too narrow
/// to point at, and they would make the file several times larger.
pub const MIN_FRAME_WIDTH_PX: f64 = 0.5;

/// Name of the bottom frame, which spans all samples.
const ROOT_NAME: &str = "all";

/// A frame of the flame graph: one function at one depth of one call path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlameFrame {
    /// The annotated name from the collapsed stacks, or `all` for the bottom frame.
    pub name: String,
    /// 0 for the bottom frame, 1 for thread names, then one more per call.
    pub depth: usize,
    /// Samples of the frames left of this one at its depth; the x position in samples.
    pub start: u64,
    pub samples: u64,
}

/// Samples of one call path and the calls made from it.
#[derive(Debug, Default)]
struct Node {
    samples: u64,
    children: BTreeMap<String, Node>,
}

/// Merges the stacks into a tree of call paths and returns its frames, parents before their
/// children. Siblings are sorted by name, so the same call paths always give the same graph.
pub fn layout(stacks: &FoldedStacks) -> Vec<FlameFrame> {
    let mut root = Node::default();
    for stack in &stacks.stacks {
        root.samples += stack.samples;
        let mut node = &mut root;
        for frame in &stack.frames {
            node = node.children.entry(frame.clone()).or_default();
            node.samples += stack.samples;
        }
    }
    let mut frames = Vec::new();
    push_frames(ROOT_NAME, &root, 0, 0, &mut frames);
    frames
}

fn push_frames(name: &str, node: &Node, depth: usize, start: u64, frames: &mut Vec<FlameFrame>) {
    frames.push(FlameFrame {
        name: name.to_owned(),
        depth,
        start,
        samples: node.samples,
    });
    let mut child_start = start;
    for (child_name, child) in &node.children {
        push_frames(child_name, child, depth + 1, child_start, frames);
        child_start += child.samples;
    }
}

/// Renders the flame graph of `stacks` with a title and a subtitle line.
pub fn render_svg(title: &str, subtitle: &str, stacks: &FoldedStacks) -> String {
    let frames = layout(stacks);
    let total = frames.first().map_or(0, |f| f.samples).max(1);
    let scale = (WIDTH - 2.0 * MARGIN_X) / total as f64;
    let visible: Vec<&FlameFrame> = frames
        .iter()
        .filter(|f| f.samples as f64 * scale >= MIN_FRAME_WIDTH_PX)
        .collect();
    let max_depth = visible.iter().map(|f| f.depth).max().unwrap_or(0);
    let height = HEADER_HEIGHT + FRAME_HEIGHT * (max_depth + 1) as f64 + FOOTER_HEIGHT;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="Verdana, sans-serif" font-size="{FONT_SIZE}">"#
    );
    let _ = writeln!(svg, "<title>{}</title>", escape(title));
    svg.push_str(
        "<style>g:hover rect { stroke: black; stroke-width: 0.5; } text { pointer-events: none; }</style>\n",
    );
    svg.push_str(r#"<rect width="100%" height="100%" fill="white"/>"#);
    svg.push('\n');
    let _ = writeln!(
        svg,
        r#"<text x="{MARGIN_X}" y="22" font-size="16" font-weight="bold">{}</text>"#,
        escape(title)
    );
    let _ = writeln!(
        svg,
        r#"<text x="{MARGIN_X}" y="42">{}</text>"#,
        escape(subtitle)
    );
    legend(&mut svg, total);

    for frame in visible {
        let x = MARGIN_X + frame.start as f64 * scale;
        let width = frame.samples as f64 * scale;
        let y = height - FOOTER_HEIGHT - FRAME_HEIGHT * (frame.depth + 1) as f64;
        let (name, space, inlined) = split_annotation(&frame.name);
        let kind = match (space, inlined) {
            (Space::Kernel, _) => " (kernel)",
            (Space::User, true) => " (inlined)",
            (Space::User, false) => "",
        };
        let _ = write!(
            svg,
            r#"<g><title>{}{kind}: {}, {:.2} %</title><rect x="{x:.2}" y="{y:.1}" width="{width:.2}" height="{:.1}" fill="{}"/>"#,
            escape(name),
            sample_count(frame.samples),
            frame.samples as f64 * 100.0 / total as f64,
            FRAME_HEIGHT - 1.0,
            frame_color(&frame.name, frame.depth)
        );
        if let Some(label) = fit_label(name, width) {
            let _ = write!(
                svg,
                r#"<text x="{:.2}" y="{:.1}">{}</text>"#,
                x + 3.0,
                y + FRAME_HEIGHT - 4.5,
                escape(&label)
            );
        }
        svg.push_str("</g>\n");
    }
    svg.push_str("</svg>\n");
    svg
}

fn legend(svg: &mut String, total: u64) {
    let y = 52.0;
    let _ = writeln!(
        svg,
        r#"<rect x="{MARGIN_X}" y="{y}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{:.1}">user space</text>"#,
        user_color(0.5, 0.5, 0.5),
        MARGIN_X + 16.0,
        y + 10.0
    );
    let _ = writeln!(
        svg,
        r#"<rect x="{:.1}" y="{y}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{:.1}">kernel</text>"#,
        MARGIN_X + 100.0,
        kernel_color(0.5, 0.5),
        MARGIN_X + 116.0,
        y + 10.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}">Width is the share of {} samples. Hover a frame for its name and samples. Frames narrower than {MIN_FRAME_WIDTH_PX} px are left out.</text>"#,
        MARGIN_X + 180.0,
        y + 10.0,
        thousands(total as f64)
    );
}

/// Formats a number of samples, for example `1 sample` or `1,234 samples`.
fn sample_count(samples: u64) -> String {
    if samples == 1 {
        "1 sample".to_owned()
    } else {
        format!("{} samples", thousands(samples as f64))
    }
}

/// Returns the label that fits `width` pixels: the whole name, or its start with `..`, or
/// `None` when not even three characters fit.
fn fit_label(name: &str, width: f64) -> Option<String> {
    let fits = ((width - 6.0) / CHAR_WIDTH).floor();
    if fits < 3.0 {
        return None;
    }
    let fits = fits as usize;
    if name.chars().count() <= fits {
        return Some(name.to_owned());
    }
    let mut label: String = name.chars().take(fits - 2).collect();
    label.push_str("..");
    Some(label)
}

/// Returns the fill of a frame: gray for the bottom frame and `[unknown]`, blue for the
/// kernel and red to yellow for user space. The shade comes from a hash of the name, so a
/// function has the same color everywhere in the graph and in every profile.
fn frame_color(frame: &str, depth: usize) -> String {
    let (name, space, _) = split_annotation(frame);
    if depth == 0 || name == "[unknown]" {
        return "rgb(200,200,200)".to_owned();
    }
    let hash = fnv1a(name.as_bytes());
    let unit = |shift: u32| ((hash >> shift) & 0xff) as f64 / 255.0;
    match space {
        Space::Kernel => kernel_color(unit(0), unit(8)),
        Space::User => user_color(unit(0), unit(8), unit(16)),
    }
}

/// Returns a color of the "hot" palette of flamegraph.pl, red to yellow.
fn user_color(a: f64, b: f64, c: f64) -> String {
    format!(
        "rgb({:.0},{:.0},{:.0})",
        205.0 + 50.0 * c,
        230.0 * a,
        55.0 * b
    )
}

fn kernel_color(a: f64, b: f64) -> String {
    format!(
        "rgb({:.0},{:.0},{:.0})",
        70.0 + 60.0 * a,
        150.0 + 60.0 * b,
        230.0 + 25.0 * a
    )
}

/// Hashes `bytes` with 64-bit FNV-1a, whose result, unlike `DefaultHasher`'s, stays the same
/// across runs and Rust versions.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stacks(pairs: &[(&str, u64)]) -> FoldedStacks {
        FoldedStacks::from_pairs(pairs)
    }

    fn frame(name: &str, depth: usize, start: u64, samples: u64) -> FlameFrame {
        FlameFrame {
            name: name.to_owned(),
            depth,
            start,
            samples,
        }
    }

    #[test]
    fn layout_merges_and_sorts_siblings() {
        let frames = layout(&stacks(&[
            ("t;main;b", 3),
            ("t;main;a", 2),
            ("t;main", 1),
            ("t;main;a;x_[k]", 4),
        ]));
        assert_eq!(
            frames,
            vec![
                frame("all", 0, 0, 10),
                frame("t", 1, 0, 10),
                frame("main", 2, 0, 10),
                frame("a", 3, 0, 6),
                frame("x_[k]", 4, 0, 4),
                frame("b", 3, 6, 3),
            ]
        );
    }

    #[test]
    fn layout_keeps_threads_apart() {
        let frames = layout(&stacks(&[("w1;run", 5), ("w0;run", 5)]));
        let threads: Vec<&FlameFrame> = frames.iter().filter(|f| f.depth == 1).collect();
        assert_eq!(threads[0], &frame("w0", 1, 0, 5));
        assert_eq!(threads[1], &frame("w1", 1, 5, 5));
        assert_eq!(frames.iter().filter(|f| f.name == "run").count(), 2);
    }

    #[test]
    fn children_never_exceed_parent() {
        let frames = layout(&stacks(&[
            ("t;a;b;c", 7),
            ("t;a;d", 2),
            ("t;e", 1),
            ("u;a;b", 3),
        ]));
        for parent in &frames {
            let children: u64 = frames
                .iter()
                .filter(|f| {
                    f.depth == parent.depth + 1
                        && f.start >= parent.start
                        && f.start < parent.start + parent.samples
                })
                .map(|f| f.samples)
                .sum();
            assert!(children <= parent.samples, "{parent:?}");
        }
    }

    #[test]
    fn empty_stacks_give_only_root() {
        assert_eq!(
            layout(&FoldedStacks::default()),
            vec![frame("all", 0, 0, 0)]
        );
        assert!(render_svg("t", "s", &FoldedStacks::default()).ends_with("</svg>\n"));
    }

    #[test]
    fn svg_has_tooltips_and_kernel_color() {
        let svg = render_svg(
            "edge <keep-alive>",
            "test",
            &stacks(&[("t;main;tcp_sendmsg_[k]", 3), ("t;main;parse_[i]", 1)]),
        );
        assert!(svg.contains("<title>edge &lt;keep-alive&gt;</title>"));
        assert!(svg.contains("<title>tcp_sendmsg (kernel): 3 samples, 75.00 %</title>"));
        assert!(svg.contains("<title>parse (inlined): 1 sample, 25.00 %</title>"));
        let kernel_fill = frame_color("tcp_sendmsg_[k]", 3);
        let user_fill = frame_color("main", 2);
        assert!(svg.contains(&format!("fill=\"{kernel_fill}\"")));
        assert!(svg.contains(&format!("fill=\"{user_fill}\"")));
        assert_ne!(kernel_fill, user_fill);
    }

    #[test]
    fn narrow_frames_are_left_out() {
        let svg = render_svg(
            "t",
            "s",
            &stacks(&[("t;wide", 100_000), ("t;tiny_leaf", 1)]),
        );
        assert!(svg.contains("<title>wide: 100,000 samples"));
        assert!(!svg.contains("tiny_leaf"));
    }

    #[test]
    fn kernel_and_user_palettes_differ() {
        for name in ["a", "tcp_sendmsg", "edge::worker::run", "[libc.so.6]"] {
            let kernel = frame_color(&format!("{name}_[k]"), 2);
            let user = frame_color(name, 2);
            let blue = |rgb: &str| -> u32 {
                rgb.trim_end_matches(')')
                    .rsplit(',')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            };
            assert!(blue(&kernel) >= 230, "{kernel}");
            assert!(blue(&user) <= 55, "{user}");
        }
    }

    #[test]
    fn labels_are_cut_to_fit() {
        assert_eq!(fit_label("abcdef", 100.0).as_deref(), Some("abcdef"));
        assert_eq!(
            fit_label("abcdefghijklmnop", 6.0 + 5.0 * CHAR_WIDTH).as_deref(),
            Some("abc..")
        );
        assert_eq!(fit_label("abcdef", 10.0), None);
    }
}
