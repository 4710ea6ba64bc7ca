//! The demo's timeline picture (SVG): request rate and errors over time, each node's phases as
//! bands, the versions clients saw, and the VIP failover as a marker.

use std::fmt::Write as _;

use serde_json::Value;

const WIDTH: f64 = 1100.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 30.0;
const RATE_TOP: f64 = 60.0;
const RATE_HEIGHT: f64 = 180.0;
const BAND_HEIGHT: f64 = 26.0;

/// Colours of the drain phases (serving is the empty background).
fn phase_colour(phase: &str) -> &'static str {
    match phase {
        "draining" => "#f0a030",
        "drained" => "#e8d040",
        "restarting" => "#d04040",
        "verifying" => "#9050c0",
        "failed" => "#000000",
        // In rotation throughout: the new version starts beside the old one.
        "handing-over" => "#50a0d0",
        _ => "#60b060",
    }
}

/// Colours of the versions, in the order they were seen.
const VERSION_COLOURS: [&str; 4] = ["#4a7fd0", "#30a060", "#c06020", "#808080"];

/// `report` is the demo report; `samples` the load balancers' counters over time; `probes` the
/// version probe's answers.
pub fn render(report: &Value, samples: &Value, probes: &Value) -> String {
    let duration_ms = report["duration_ms"].as_f64().unwrap_or(1.0).max(1.0);
    let plot_width = WIDTH - LEFT - RIGHT;
    let x = |ms: f64| LEFT + ms / duration_ms * plot_width;
    let nodes = report["nodes"].as_array().cloned().unwrap_or_default();
    let bands_top = RATE_TOP + RATE_HEIGHT + 50.0;
    let versions_top = bands_top + BAND_HEIGHT * nodes.len() as f64 + 20.0;
    let height = versions_top + BAND_HEIGHT + 90.0;

    // Request rate (per second) from consecutive counter samples.
    let samples = samples.as_array().cloned().unwrap_or_default();
    let mut rates = Vec::new();
    let mut errors = Vec::new();
    for pair in samples.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let dt = (b["at_ms"].as_f64().unwrap_or(0.0) - a["at_ms"].as_f64().unwrap_or(0.0)) / 1000.0;
        if dt <= 0.0 {
            continue;
        }
        let requests =
            b["requests"].as_f64().unwrap_or(0.0) - a["requests"].as_f64().unwrap_or(0.0);
        let failed =
            b["errors_5xx"].as_f64().unwrap_or(0.0) - a["errors_5xx"].as_f64().unwrap_or(0.0);
        let at = b["at_ms"].as_f64().unwrap_or(0.0);
        rates.push((at, (requests / dt).max(0.0)));
        if failed > 0.0 {
            errors.push((at, failed));
        }
    }
    let max_rate = rates.iter().map(|r| r.1).fold(1.0, f64::max) * 1.15;
    let y = |rate: f64| RATE_TOP + RATE_HEIGHT - rate / max_rate * RATE_HEIGHT;

    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="DejaVu Sans, Arial, sans-serif" font-size="13">
<rect width="100%" height="100%" fill="white"/>
<text x="{LEFT}" y="28" font-size="18" font-weight="bold">{title}: {requests} requests, {failed} failed, {non2xx} non-2xx</text>
"##,
        title = report["title"]
            .as_str()
            .unwrap_or("Rolling upgrade under load"),
        requests = report["load"]["requests"],
        failed = report["load"]["failed"],
        non2xx = report["load"]["non_2xx"],
    );
    // The capacity kept: with cycles a node leaves the rotation for its drain and restart,
    // with handovers it never does.
    if let Some(capacity) = report["capacity"].as_object() {
        let _ = writeln!(
            svg,
            r##"<text x="{LEFT}" y="48" fill="#333">{operation}: at least {min} of {servers} servers in rotation throughout; {out} server-seconds out of rotation</text>"##,
            operation = report["operation"].as_str().unwrap_or("cycle"),
            min = capacity["min_in_rotation"],
            servers = capacity["servers"],
            out = capacity["server_seconds_out_of_rotation"],
        );
    }

    // Axes and grid.
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{RATE_TOP}" width="{plot_width}" height="{RATE_HEIGHT}" fill="#fafafa" stroke="#999"/>"##
    );
    for i in 0..=4 {
        let value = max_rate / 4.0 * i as f64;
        let yy = y(value);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#e4e4e4"/><text x="{}" y="{:.1}" text-anchor="end" fill="#555">{value:.0}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            yy + 4.0
        );
    }
    let _ = writeln!(
        svg,
        r##"<text x="16" y="{:.1}" transform="rotate(-90 16 {:.1})" text-anchor="middle" fill="#333">requests/s (both LBs)</text>"##,
        RATE_TOP + RATE_HEIGHT / 2.0,
        RATE_TOP + RATE_HEIGHT / 2.0
    );
    let seconds = duration_ms / 1000.0;
    // At most about 20 labelled ticks, whatever the length.
    let step = [5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0]
        .into_iter()
        .find(|step| seconds / step <= 20.0)
        .unwrap_or(1200.0);
    let mut t = 0.0;
    while t <= seconds {
        let xx = x(t * 1000.0);
        let _ = writeln!(
            svg,
            r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{RATE_TOP}" y2="{:.1}" stroke="#eee"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle" fill="#555">{t:.0}s</text>"##,
            versions_top + BAND_HEIGHT,
            versions_top + BAND_HEIGHT + 18.0
        );
        t += step;
    }

    // The rate line and error marks.
    let points: Vec<String> = rates
        .iter()
        .map(|(at, rate)| format!("{:.1},{:.1}", x(*at), y(*rate)))
        .collect();
    let _ = writeln!(
        svg,
        r##"<polyline fill="none" stroke="#2060c0" stroke-width="1.6" points="{}"/>"##,
        points.join(" ")
    );
    for probe in probes.as_array().into_iter().flatten() {
        if probe["status"].as_u64() != Some(200) {
            let xx = x(probe["at_ms"].as_f64().unwrap_or(0.0));
            let _ = writeln!(
                svg,
                r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{RATE_TOP}" y2="{:.1}" stroke="#d00000" stroke-width="2"/>"##,
                RATE_TOP + RATE_HEIGHT
            );
        }
    }
    for (at, count) in &errors {
        let xx = x(*at);
        let _ = writeln!(
            svg,
            r##"<circle cx="{xx:.1}" cy="{:.1}" r="4" fill="#d00000"><title>{count} 5xx</title></circle>"##,
            RATE_TOP + RATE_HEIGHT - 6.0
        );
    }

    // Phase bands, one row per node.
    let _ = writeln!(
        svg,
        r##"<text x="{LEFT}" y="{:.1}" font-weight="bold">Node phases</text>"##,
        bands_top - 10.0
    );
    for (row, node) in nodes.iter().enumerate() {
        let top = bands_top + BAND_HEIGHT * row as f64;
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text><rect x="{LEFT}" y="{top:.1}" width="{plot_width}" height="{:.1}" fill="#eef6ee" stroke="#ccc"/>"##,
            LEFT - 6.0,
            top + 17.0,
            node["name"].as_str().unwrap_or("?"),
            BAND_HEIGHT - 4.0
        );
        // The demo has one cycle per node; the soak lists them under "cycles".
        let single = [node.clone()];
        let cycles = node["cycles"].as_array().map_or(&single[..], Vec::as_slice);
        let phases = cycles.iter().flat_map(|cycle| {
            let start = cycle["cycle_started_ms"].as_f64().unwrap_or(0.0);
            cycle["report"]["phases"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |phase| (start, phase))
        });
        for (cycle_start, phase) in phases {
            let name = phase["phase"].as_str().unwrap_or("serving");
            if name == "serving" {
                continue;
            }
            let start = cycle_start + phase["started_ms"].as_f64().unwrap_or(0.0);
            let width =
                (x(start + phase["duration_ms"].as_f64().unwrap_or(0.0)) - x(start)).max(2.0);
            let _ = writeln!(
                svg,
                r##"<rect x="{:.1}" y="{top:.1}" width="{width:.1}" height="{:.1}" fill="{}"><title>{name}</title></rect>"##,
                x(start),
                BAND_HEIGHT - 4.0,
                phase_colour(name)
            );
        }
        // The kernel gate's closed span, a dark line along the bottom of the band.
        for cycle in cycles {
            let gate = &cycle["report"]["gate"];
            let Some(closed) = gate["closed_ms"].as_f64() else {
                continue;
            };
            let start = cycle["cycle_started_ms"].as_f64().unwrap_or(0.0);
            let opened = gate["opened_ms"]
                .as_f64()
                .unwrap_or_else(|| cycle["report"]["total_ms"].as_f64().unwrap_or(closed));
            let _ = writeln!(
                svg,
                r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="3" fill="#222"><title>gate closed: {} new connection(s) refused</title></rect>"##,
                x(start + closed),
                top + BAND_HEIGHT - 7.0,
                (x(start + opened) - x(start + closed)).max(2.0),
                gate["refused"]
            );
        }
    }

    // Injected faults, a mark on the node's row each.
    for (row, node) in nodes.iter().enumerate() {
        let top = bands_top + BAND_HEIGHT * row as f64;
        for fault in node["faults"].as_array().into_iter().flatten() {
            let Some(at) = fault["at_ms"].as_f64() else {
                continue;
            };
            let xx = x(at);
            let _ = writeln!(
                svg,
                r##"<path d="M{:.1},{top:.1} L{:.1},{top:.1} L{xx:.1},{:.1} Z" fill="#000"><title>{}</title></path>"##,
                xx - 5.0,
                xx + 5.0,
                top + 9.0,
                fault["kind"].as_str().unwrap_or("fault")
            );
        }
    }

    // Versions clients saw (probe answers).
    let mut seen: Vec<String> = Vec::new();
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="end">version</text>"##,
        LEFT - 6.0,
        versions_top + 17.0
    );
    // Consecutive answers of one version make one run (a long soak has thousands).
    let mut runs: Vec<(usize, f64, f64)> = Vec::new();
    for probe in probes.as_array().into_iter().flatten() {
        let Some(version) = probe["version"].as_str() else {
            continue;
        };
        let index = seen.iter().position(|v| v == version).unwrap_or_else(|| {
            seen.push(version.to_string());
            seen.len() - 1
        });
        let at = probe["at_ms"].as_f64().unwrap_or(0.0);
        match runs.last_mut() {
            Some(run) if run.0 == index => run.2 = at,
            _ => runs.push((index, at, at)),
        }
    }
    for (index, from, to) in runs {
        let xx = x(from);
        let _ = writeln!(
            svg,
            r##"<rect x="{xx:.1}" y="{versions_top:.1}" width="{:.1}" height="{:.1}" fill="{}"/>"##,
            (x(to) - xx).max(0.0) + 3.0,
            BAND_HEIGHT - 4.0,
            VERSION_COLOURS[index.min(VERSION_COLOURS.len() - 1)]
        );
    }

    // The failover markers (the demo has one, the soak a list).
    let failovers = report["failovers"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| vec![report["failover"].clone()]);
    // A long soak has many: then only the marks, no labels.
    let label_failovers = failovers.len() <= 3;
    for failover in &failovers {
        let Some(moved) = failover["vip_moved_at_ms"].as_f64() else {
            continue;
        };
        let stopped = failover["stopped_at_ms"].as_f64().unwrap_or(moved);
        let (xs, xm) = (x(stopped), x(moved));
        let _ = writeln!(
            svg,
            r##"<rect x="{xs:.1}" y="{RATE_TOP}" width="{:.1}" height="{:.1}" fill="#000" opacity="0.08"/><line x1="{xm:.1}" x2="{xm:.1}" y1="{:.1}" y2="{:.1}" stroke="#000" stroke-dasharray="6,4" stroke-width="1.5"/><text x="{:.1}" y="{:.1}">{}</text>"##,
            (xm - xs).max(2.0),
            versions_top + BAND_HEIGHT - RATE_TOP,
            RATE_TOP - 8.0,
            versions_top + BAND_HEIGHT,
            xm + 4.0,
            RATE_TOP + 14.0,
            if label_failovers {
                format!(
                    "VIP failover: {} → {}",
                    failover["haproxy_stopped_on"].as_str().unwrap_or("?"),
                    failover["vip_moved_to"].as_str().unwrap_or("?")
                )
            } else {
                String::new()
            }
        );
    }

    // Legend.
    let legend_y = versions_top + BAND_HEIGHT + 45.0;
    let mut lx = LEFT;
    let mut item = |svg: &mut String, colour: &str, label: &str| {
        let _ = writeln!(
            svg,
            r##"<rect x="{lx:.1}" y="{:.1}" width="14" height="14" fill="{colour}"/><text x="{:.1}" y="{legend_y:.1}">{label}</text>"##,
            legend_y - 11.0,
            lx + 19.0
        );
        lx += 30.0 + label.len() as f64 * 7.5;
    };
    let handover = report["operation"] == "handover";
    let phases: &[&str] = if handover {
        &["handing-over"]
    } else {
        &["draining", "drained", "restarting", "verifying"]
    };
    for phase in phases {
        item(&mut svg, phase_colour(phase), phase);
    }
    item(&mut svg, "#222", "gate closed");
    for (index, version) in seen.iter().enumerate() {
        item(
            &mut svg,
            VERSION_COLOURS[index.min(VERSION_COLOURS.len() - 1)],
            &format!("version {version}"),
        );
    }
    item(&mut svg, "#d00000", "failed request / 5xx");
    if !label_failovers {
        item(&mut svg, "#888", "- - VIP failover");
    }
    if nodes
        .iter()
        .any(|node| node["faults"].as_array().is_some_and(|f| !f.is_empty()))
    {
        item(&mut svg, "#000", "injected fault");
    }
    svg.push_str("</svg>\n");
    svg
}
