//! Hand-written SVG plots of a harness run: latency percentiles per scenario, and requests per
//! second per closed-loop scenario.

use std::fmt::Write as _;

use crate::{
    report::thousands,
    results::{RunResults, Scenario},
};

const WIDTH: f64 = 760.0;
const PANEL_HEIGHT: f64 = 250.0;
const LEGEND_HEIGHT: f64 = 34.0;
const MARGIN_LEFT: f64 = 70.0;
const MARGIN_RIGHT: f64 = 20.0;
const MARGIN_TOP: f64 = 30.0;
const MARGIN_BOTTOM: f64 = 42.0;

/// Highest percentile on the latency plot's x axis; 100 (the maximum) has no place on a
/// "nines" scale.
const MAX_PLOTTED_PERCENTILE: f64 = 99.99;

/// Returns the plot color of a target.
fn color(target: &str, index: usize) -> &'static str {
    match target {
        "edge" => "#d62728",
        "nginx" => "#2ca02c",
        "haproxy" => "#1f77b4",
        "traefik" => "#9467bd",
        "caddy" => "#ff7f0e",
        "direct" => "#555555",
        _ => ["#8c564b", "#e377c2", "#17becf", "#bcbd22"][index % 4],
    }
}

/// Renders the latency-percentile plot: one panel per scenario, x is the percentile on a
/// "nines" scale (90, 99, 99.9 evenly spaced), y is the latency on a log scale.
pub fn latency_plot(results: &RunResults) -> String {
    let targets = results.measured_targets();
    let scenarios: Vec<Scenario> = Scenario::CLOSED_LOOP
        .into_iter()
        .chain([Scenario::FixedRate])
        .filter(|&s| targets.iter().any(|t| results.aggregate(s, t).is_some()))
        .collect();
    let height = LEGEND_HEIGHT + PANEL_HEIGHT * scenarios.len().max(1) as f64;
    let mut svg = open_svg(height, "Latency by percentile");
    legend(&mut svg, &targets);
    let max_nines = nines(MAX_PLOTTED_PERCENTILE);
    for (panel, &scenario) in scenarios.iter().enumerate() {
        let top = LEGEND_HEIGHT + PANEL_HEIGHT * panel as f64;
        // (target index, target name, points as (nines, µs))
        type Curve<'a> = (usize, &'a str, Vec<(f64, f64)>);
        let curves: Vec<Curve<'_>> = targets
            .iter()
            .enumerate()
            .filter_map(|(i, &t)| {
                let agg = results.aggregate(scenario, t)?;
                let points: Vec<(f64, f64)> = agg
                    .latency_curve_us
                    .iter()
                    .filter(|(p, us)| *p <= MAX_PLOTTED_PERCENTILE && us.is_finite() && *us > 0.0)
                    .map(|&(p, us)| (nines(p), us))
                    .collect();
                Some((i, t, points))
            })
            .collect();
        let all_us: Vec<f64> = curves
            .iter()
            .flat_map(|(_, _, points)| points.iter().map(|&(_, us)| us))
            .collect();
        let (low, high) = log_range(&all_us);
        let frame = Frame::new(top);
        let title = if scenario == Scenario::FixedRate {
            format!(
                "{} at {} req/s (coordinated-omission corrected)",
                scenario.label(),
                thousands(results.settings.fixed_rate_per_s)
            )
        } else {
            format!("{}, closed loop", scenario.label())
        };
        frame.title(&mut svg, &title);
        frame.axes(&mut svg);
        for tick in log_ticks(low, high) {
            let y = frame.y_log(tick, low, high);
            frame.y_tick(&mut svg, y, &thousands(tick));
        }
        for (p, label) in [
            (0.0, "0"),
            (90.0, "90"),
            (99.0, "99"),
            (99.9, "99.9"),
            (99.99, "99.99"),
        ] {
            let x = frame.x(nines(p) / max_nines);
            frame.x_tick(&mut svg, x, label);
        }
        frame.x_label(&mut svg, "percentile");
        frame.y_label(&mut svg, "latency µs");
        for (index, target, points) in &curves {
            let path: Vec<String> = points
                .iter()
                .map(|&(n, us)| {
                    format!(
                        "{:.1},{:.1}",
                        frame.x(n / max_nines),
                        frame.y_log(us, low, high)
                    )
                })
                .collect();
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"><title>{}</title></polyline>"#,
                color(target, *index),
                path.join(" "),
                escape(target)
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// Renders the throughput bar chart: one panel per closed-loop scenario, a bar per target at
/// the median requests per second, with a whisker from the minimum to the maximum round.
pub fn throughput_plot(results: &RunResults) -> String {
    let targets = results.measured_targets();
    let scenarios: Vec<Scenario> = Scenario::CLOSED_LOOP
        .into_iter()
        .filter(|&s| targets.iter().any(|t| results.aggregate(s, t).is_some()))
        .collect();
    let height = LEGEND_HEIGHT + PANEL_HEIGHT * scenarios.len().max(1) as f64;
    let mut svg = open_svg(height, "Requests per second");
    legend(&mut svg, &targets);
    for (panel, &scenario) in scenarios.iter().enumerate() {
        let top = LEGEND_HEIGHT + PANEL_HEIGHT * panel as f64;
        let frame = Frame::new(top);
        let bars: Vec<(usize, &str, f64, f64, f64)> = targets
            .iter()
            .enumerate()
            .filter_map(|(i, &t)| {
                let spread = results.aggregate(scenario, t)?.requests_per_s;
                Some((i, t, spread.median, spread.min, spread.max))
            })
            .collect();
        // Headroom above the highest whisker keeps its value label inside the panel.
        let top_value = bars.iter().map(|b| b.4).fold(0.0, f64::max) * 1.08;
        let step = nice_step(top_value, 5);
        let axis_max = (top_value / step).ceil().max(1.0) * step;
        frame.title(&mut svg, &format!("{}, closed loop", scenario.label()));
        frame.axes(&mut svg);
        let mut tick = 0.0;
        while tick <= axis_max + step / 2.0 {
            frame.y_tick(&mut svg, frame.y_linear(tick, axis_max), &thousands(tick));
            tick += step;
        }
        frame.y_label(&mut svg, "requests/s");
        let slot = frame.width() / bars.len().max(1) as f64;
        let bar_width = slot * 0.6;
        for (n, &(index, target, median, min, max)) in bars.iter().enumerate() {
            let x = frame.x(0.0) + slot * n as f64 + (slot - bar_width) / 2.0;
            let y = frame.y_linear(median, axis_max);
            let base = frame.y_linear(0.0, axis_max);
            let center = x + bar_width / 2.0;
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{bar_width:.1}" height="{:.1}" fill="{}"><title>{}: {} req/s</title></rect>"#,
                (base - y).max(0.0),
                color(target, index),
                escape(target),
                thousands(median)
            );
            let (y_min, y_max) = (frame.y_linear(min, axis_max), frame.y_linear(max, axis_max));
            let _ = writeln!(
                svg,
                r#"<path d="M{center:.1},{y_min:.1}V{y_max:.1}M{:.1},{y_min:.1}H{:.1}M{:.1},{y_max:.1}H{:.1}" stroke="black" stroke-width="1"/>"#,
                center - 5.0,
                center + 5.0,
                center - 5.0,
                center + 5.0
            );
            let _ = writeln!(
                svg,
                r#"<text x="{center:.1}" y="{:.1}" text-anchor="middle" font-size="11">{}</text>"#,
                y_max - 4.0,
                thousands(median)
            );
            let _ = writeln!(
                svg,
                r#"<text x="{center:.1}" y="{:.1}" text-anchor="middle" font-size="12">{}</text>"#,
                base + 16.0,
                escape(target)
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

fn open_svg(height: f64, title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         viewBox=\"0 0 {WIDTH} {height}\" font-family=\"sans-serif\">\n<title>{}</title>\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        escape(title)
    )
}

fn legend(svg: &mut String, targets: &[&str]) {
    let mut x = MARGIN_LEFT;
    for (index, target) in targets.iter().enumerate() {
        let _ = writeln!(
            svg,
            r#"<rect x="{x:.1}" y="10" width="14" height="14" fill="{}"/><text x="{:.1}" y="22" font-size="13">{}</text>"#,
            color(target, index),
            x + 19.0,
            escape(target)
        );
        x += 30.0 + 8.0 * target.len() as f64;
    }
}

/// The plotting area of one panel.
struct Frame {
    top: f64,
}

impl Frame {
    fn new(top: f64) -> Self {
        Self { top }
    }

    fn width(&self) -> f64 {
        WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    }

    fn plot_top(&self) -> f64 {
        self.top + MARGIN_TOP
    }

    fn plot_bottom(&self) -> f64 {
        self.top + PANEL_HEIGHT - MARGIN_BOTTOM
    }

    /// Maps a fraction of the width (0 to 1) to an x coordinate.
    fn x(&self, fraction: f64) -> f64 {
        MARGIN_LEFT + fraction * self.width()
    }

    fn y_linear(&self, value: f64, max: f64) -> f64 {
        let fraction = if max > 0.0 { value / max } else { 0.0 };
        self.plot_bottom() - fraction * (self.plot_bottom() - self.plot_top())
    }

    fn y_log(&self, value: f64, low: f64, high: f64) -> f64 {
        let fraction = (value.max(low).ln() - low.ln()) / (high.ln() - low.ln());
        self.plot_bottom() - fraction * (self.plot_bottom() - self.plot_top())
    }

    fn title(&self, svg: &mut String, text: &str) {
        let _ = writeln!(
            svg,
            r#"<text x="{MARGIN_LEFT}" y="{:.1}" font-size="14" font-weight="bold">{}</text>"#,
            self.top + 18.0,
            escape(text)
        );
    }

    fn axes(&self, svg: &mut String) {
        let _ = writeln!(
            svg,
            r#"<path d="M{MARGIN_LEFT},{:.1}V{:.1}H{:.1}" fill="none" stroke="black"/>"#,
            self.plot_top(),
            self.plot_bottom(),
            self.x(1.0)
        );
    }

    fn y_tick(&self, svg: &mut String, y: f64, label: &str) {
        let _ = writeln!(
            svg,
            r##"<path d="M{MARGIN_LEFT},{y:.1}H{:.1}" stroke="#dddddd"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11">{}</text>"##,
            self.x(1.0),
            MARGIN_LEFT - 5.0,
            y + 4.0,
            escape(label)
        );
    }

    fn x_tick(&self, svg: &mut String, x: f64, label: &str) {
        let _ = writeln!(
            svg,
            r##"<path d="M{x:.1},{:.1}V{:.1}" stroke="#dddddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" font-size="11">{}</text>"##,
            self.plot_top(),
            self.plot_bottom(),
            self.plot_bottom() + 15.0,
            escape(label)
        );
    }

    fn x_label(&self, svg: &mut String, text: &str) {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="12">{}</text>"#,
            self.x(0.5),
            self.plot_bottom() + 32.0,
            escape(text)
        );
    }

    fn y_label(&self, svg: &mut String, text: &str) {
        let y = (self.plot_top() + self.plot_bottom()) / 2.0;
        let _ = writeln!(
            svg,
            r#"<text x="16" y="{y:.1}" text-anchor="middle" font-size="12" transform="rotate(-90 16 {y:.1})">{}</text>"#,
            escape(text)
        );
    }
}

/// Maps a percentile to its number of nines: 90 → 1, 99 → 2, 99.9 → 3.
fn nines(percentile: f64) -> f64 {
    -(1.0 - percentile / 100.0).log10()
}

/// Returns a log-scale range covering `values`, widened to whole decades.
fn log_range(values: &[f64]) -> (f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(0.0, f64::max);
    if !min.is_finite() || max <= 0.0 {
        return (1.0, 1000.0);
    }
    let low = 10f64.powf(min.max(1.0).log10().floor());
    let mut high = 10f64.powf(max.log10().ceil());
    if high <= low {
        high = low * 10.0;
    }
    (low, high)
}

/// Returns tick values at 1, 2 and 5 times each power of ten within `[low, high]`, or only
/// the powers of ten when that gives more than 10 ticks.
fn log_ticks(low: f64, high: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    let mut decade = low;
    while decade <= high * 1.0001 {
        for factor in [1.0, 2.0, 5.0] {
            let value = decade * factor;
            if value <= high * 1.0001 {
                ticks.push(value);
            }
        }
        decade *= 10.0;
    }
    if ticks.len() > 10 {
        ticks.retain(|v| (v.log10() - v.log10().round()).abs() < 1e-9);
    }
    ticks
}

/// Returns a step of 1, 2 or 5 times a power of ten that divides `[0, max]` into at most
/// `ticks` intervals.
fn nice_step(max: f64, ticks: usize) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let rough = max / ticks.max(1) as f64;
    let magnitude = 10f64.powf(rough.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|f| f * magnitude)
        .find(|&step| step >= rough)
        .unwrap_or(10.0 * magnitude)
}

/// Escapes text for SVG element content and attribute values.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nines_of_common_percentiles() {
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert_eq!(nines(0.0), 0.0);
    }

    #[test]
    fn nice_step_picks_round_values() {
        assert_eq!(nice_step(47_000.0, 5), 10_000.0);
        assert_eq!(nice_step(9_000.0, 5), 2_000.0);
        assert_eq!(nice_step(0.0, 5), 1.0);
    }

    #[test]
    fn log_range_widens_to_decades() {
        assert_eq!(log_range(&[35.0, 1_800.0]), (10.0, 10_000.0));
        assert_eq!(log_range(&[]), (1.0, 1000.0));
    }

    #[test]
    fn log_ticks_within_range() {
        assert_eq!(log_ticks(10.0, 100.0), vec![10.0, 20.0, 50.0, 100.0]);
        let wide = log_ticks(1.0, 1_000_000.0);
        assert_eq!(wide.len(), 7);
    }

    #[test]
    fn escape_markup_characters() {
        assert_eq!(escape("a<b & \"c\">"), "a&lt;b &amp; &quot;c&quot;&gt;");
    }
}
