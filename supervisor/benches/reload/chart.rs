//! The SVG chart: for every system and client mode, requests per second
//! and failures per second over the run, with a mark at every reload
//! signal. All panels share their scales so they compare at a glance.

use crate::summary::{mode_name, BUCKET};
use crate::RunResult;
use baton_tests::load::Mode;
use std::fmt::Write;
use std::time::Duration;

const PANEL_W: f64 = 470.0;
const PANEL_H: f64 = 120.0;
const LEFT: f64 = 48.0;
const RIGHT: f64 = 40.0;
const TITLE_H: f64 = 30.0;
const AXIS_H: f64 = 22.0;
const HEADER_H: f64 = 64.0;
const OK_COLOR: &str = "#1f6fb4";
const FAIL_COLOR: &str = "#d62728";
const MARK_COLOR: &str = "#bbbbbb";

/// A round number (1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 times a power of ten)
/// at least `x`.
fn nice_ceil(x: f64) -> f64 {
    let x = x.max(1.0);
    let power = 10f64.powf(x.log10().floor());
    [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|v| *v >= x)
        .unwrap_or(10.0 * power)
}

/// `950`, `12k`, `1.5k`.
fn short_number(x: f64) -> String {
    if x >= 10_000.0 {
        format!("{:.0}k", x / 1000.0)
    } else if x >= 1000.0 {
        format!("{:.1}k", x / 1000.0)
    } else {
        format!("{x:.0}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Per bucket: (ok per second, failed per second).
fn rates(run: &RunResult) -> Vec<(f64, f64)> {
    let per_second = 1.0 / BUCKET.as_secs_f64();
    match &run.outcome {
        Ok(m) => m
            .report
            .timeline(BUCKET)
            .into_iter()
            .map(|(ok, failed)| (ok as f64 * per_second, failed as f64 * per_second))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// The chart of runs of `duration` each; `title` goes on top.
pub fn svg(runs: &[RunResult], title: &str, duration: Duration) -> String {
    // One row per scenario, in run order; one column per mode.
    let mut rows: Vec<&str> = Vec::new();
    for run in runs {
        if !rows.contains(&run.scenario.name) {
            rows.push(run.scenario.name);
        }
    }
    let columns = [Mode::KeepAlive, Mode::NewConnection];
    let all: Vec<Vec<(f64, f64)>> = runs.iter().map(rates).collect();
    let ok_max = nice_ceil(all.iter().flatten().map(|r| r.0).fold(0.0, f64::max));
    let fail_max = nice_ceil(all.iter().flatten().map(|r| r.1).fold(10.0, f64::max));
    let seconds = duration.as_secs_f64().ceil().max(1.0);
    let cell_w = LEFT + PANEL_W + RIGHT;
    let cell_h = TITLE_H + PANEL_H + AXIS_H;
    let width = 10.0 + cell_w * columns.len() as f64 + 10.0;
    let height = HEADER_H + cell_h * rows.len() as f64 + 10.0;
    let mut out = String::new();
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"22\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
        escape(title)
    );
    let legend_y = 46.0;
    let _ = write!(
        out,
        "<line x1=\"10\" y1=\"{y}\" x2=\"30\" y2=\"{y}\" stroke=\"{OK_COLOR}\" stroke-width=\"2\"/>\
         <text x=\"35\" y=\"{t}\">ok requests/s (left axis)</text>\n\
         <rect x=\"200\" y=\"{r}\" width=\"12\" height=\"10\" fill=\"{FAIL_COLOR}\"/>\
         <text x=\"217\" y=\"{t}\">failed requests/s (right axis, red)</text>\n\
         <line x1=\"430\" y1=\"{r}\" x2=\"430\" y2=\"{b}\" stroke=\"{MARK_COLOR}\" stroke-width=\"1\"/>\
         <text x=\"436\" y=\"{t}\">reload signal</text>\n\
         <text x=\"540\" y=\"{t}\" fill=\"#555\">buckets of {} ms; the same scales in every panel</text>\n",
        BUCKET.as_millis(),
        y = legend_y - 4.0,
        t = legend_y,
        r = legend_y - 9.0,
        b = legend_y + 1.0,
    );

    for (row, name) in rows.iter().enumerate() {
        for (col, mode) in columns.iter().enumerate() {
            let Some(index) = runs
                .iter()
                .position(|r| r.scenario.name == *name && r.mode == *mode)
            else {
                continue;
            };
            let x0 = 10.0 + col as f64 * cell_w + LEFT;
            let y0 = HEADER_H + row as f64 * cell_h + TITLE_H;
            panel(
                &mut out,
                &runs[index],
                &all[index],
                (x0, y0),
                (seconds, ok_max, fail_max),
            );
        }
    }
    out.push_str("</svg>\n");
    out
}

fn panel(
    out: &mut String,
    run: &RunResult,
    rates: &[(f64, f64)],
    (x0, y0): (f64, f64),
    (seconds, ok_max, fail_max): (f64, f64, f64),
) {
    let x = |s: f64| x0 + s / seconds * PANEL_W;
    let y_ok = |v: f64| y0 + PANEL_H - v / ok_max * PANEL_H;
    let y_fail = |v: f64| y0 + PANEL_H - v / fail_max * PANEL_H;
    let mut title = format!(
        "{} — {} — {}",
        run.system,
        run.scenario.reload,
        mode_name(run.mode)
    );
    let mut title_color = "black";
    match &run.outcome {
        Ok(m) => {
            let _ = write!(
                title,
                ": {} failed, {} reloads",
                m.report.failed(),
                m.cycles.len()
            );
            if m.report.failed() > 0 {
                title_color = FAIL_COLOR;
            }
        }
        Err(why) if why == "not installed" => title.push_str(": not installed"),
        Err(_) => title.push_str(": failed to run"),
    }
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"{}\" font-weight=\"bold\" fill=\"{title_color}\">{}</text>",
        x0,
        y0 - 8.0,
        escape(&title)
    );
    let _ = writeln!(
        out,
        "<rect x=\"{x0}\" y=\"{y0}\" width=\"{PANEL_W}\" height=\"{PANEL_H}\" fill=\"#fafafa\" stroke=\"#999\" stroke-width=\"0.5\"/>"
    );
    // Axes: req/s on the left, failures/s on the right, seconds below.
    for frac in [0.0, 0.5, 1.0] {
        let yy = y0 + PANEL_H - frac * PANEL_H;
        let _ = writeln!(
            out,
            "<line x1=\"{x0}\" y1=\"{yy}\" x2=\"{}\" y2=\"{yy}\" stroke=\"#e4e4e4\" stroke-width=\"0.5\"/>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\
             <text x=\"{}\" y=\"{}\" fill=\"{FAIL_COLOR}\">{}</text>",
            x0 + PANEL_W,
            x0 - 4.0,
            yy + 4.0,
            short_number(frac * ok_max),
            x0 + PANEL_W + 4.0,
            yy + 4.0,
            short_number(frac * fail_max),
        );
    }
    let step = if seconds <= 12.0 { 1.0 } else { 5.0 };
    let mut s = 0.0;
    while s <= seconds {
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#555\">{s:.0}s</text>",
            x(s),
            y0 + PANEL_H + 14.0
        );
        s += step;
    }
    let Ok(m) = &run.outcome else {
        let text = match &run.outcome {
            Err(why) if why == "not installed" => "not installed",
            _ => "did not run: see the notes",
        };
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"14\" fill=\"#777\">{text}</text>",
            x0 + PANEL_W / 2.0,
            y0 + PANEL_H / 2.0
        );
        return;
    };
    for cycle in &m.cycles {
        let xx = x(cycle.at.as_secs_f64());
        let _ = writeln!(
            out,
            "<line x1=\"{xx:.1}\" y1=\"{y0}\" x2=\"{xx:.1}\" y2=\"{}\" stroke=\"{MARK_COLOR}\" stroke-width=\"0.6\"/>",
            y0 + PANEL_H
        );
    }
    let bucket = BUCKET.as_secs_f64();
    // The last requests may start a little after the run's end.
    let buckets = (seconds / bucket).round() as usize;
    let bar_w = (x(bucket) - x(0.0)).max(1.5);
    for (i, (_, failed)) in rates.iter().take(buckets).enumerate() {
        if *failed > 0.0 {
            let top = y_fail(failed.min(fail_max));
            let _ = writeln!(
                out,
                "<rect x=\"{:.1}\" y=\"{top:.1}\" width=\"{bar_w:.1}\" height=\"{:.1}\" fill=\"{FAIL_COLOR}\" fill-opacity=\"0.8\"/>",
                x(i as f64 * bucket),
                y0 + PANEL_H - top,
            );
        }
    }
    let points: Vec<String> = rates
        .iter()
        .take(buckets)
        .enumerate()
        .map(|(i, (ok, _))| format!("{:.1},{:.1}", x((i as f64 + 0.5) * bucket), y_ok(*ok)))
        .collect();
    let _ = writeln!(
        out,
        "<polyline points=\"{}\" fill=\"none\" stroke=\"{OK_COLOR}\" stroke-width=\"1.2\"/>",
        points.join(" ")
    );
}
