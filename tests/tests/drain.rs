//! The drain cycle against real components: Debian's HAProxy (two instances), gunicorn API
//! nodes restarted by a service script, drain-agents with their kernel programs, and oha
//! hammering the load balancer at a constant rate.

use std::time::{Duration, Instant};

use drain_agent_tests::{
    http::Connection,
    load::{Connections, Load},
    topology::{API_PORT, FRONTEND_PORT, Haproxy, Topology, haproxy_config, start_api},
    two_lbs::{tier, tier_with},
    wait_until,
};
use serde_json::Value;

fn report(outcome: &drain_agent_tests::CliOutcome) -> Value {
    outcome.json()
}

#[test]
fn rolling_cycle_under_load_loses_no_request() {
    let tier = tier("drain_timeout = \"30s\"");
    let client = tier.topology.host("client");
    let url = format!("http://{}:{FRONTEND_PORT}/", tier.topology.host("lb1").v4);
    let load = Load::start(
        &client.netns,
        &client.dir,
        &url,
        200,
        Duration::from_secs(20),
        Connections::KeepAlive(16),
    );
    std::thread::sleep(Duration::from_secs(2));

    // A slow request pinned to node1 is in flight when its drain starts.
    let lb1 = tier.topology.host("lb1").addr(FRONTEND_PORT);
    let mut slow = Some(std::thread::spawn({
        let client = client.netns.name().to_string();
        move || {
            drain_agent_tests::enter_netns(&client);
            let mut connection = Connection::connect(lb1).unwrap();
            connection
                .send_raw("GET /slow?ms=3000 HTTP/1.1\r\nHost: api\r\nx-node: node1\r\n\r\n")
                .unwrap();
            let status = connection.read_response().unwrap().status;
            (status, Instant::now())
        }
    }));
    std::thread::sleep(Duration::from_millis(500));

    for (index, node) in ["node1", "node2"].iter().enumerate() {
        std::fs::write(tier.node(node).dir.join("version"), "2.0").unwrap();
        let cycle_started = Instant::now();
        let outcome = tier.agents[index].cli(&["cycle", "api", "--json"]);
        assert_eq!(outcome.code, Some(0), "cycle {node}: {outcome:?}");
        let report = report(&outcome);
        eprintln!(
            "cycle {node}: {}",
            serde_json::to_string_pretty(&report).unwrap()
        );
        assert_eq!(report["outcome"], "ok");
        assert_eq!(report["phase"], "serving");
        for lb in report["load_balancers"].as_array().unwrap() {
            if lb["via"] == "agent-check" {
                // HAProxy also polls the agent-check port; the runtime API is what vouches.
                continue;
            }
            assert_eq!(lb["via"], "runtime-api", "{node}: {lb}");
            for field in [
                "drain_confirmed_ms",
                "maint_confirmed_ms",
                "ready_confirmed_ms",
            ] {
                assert!(
                    lb[field].is_u64(),
                    "{node}: {} did not confirm {field}: {lb}",
                    lb["name"]
                );
            }
        }
        assert_eq!(report["kernel"]["cut_in_flight"], 0, "{node}: requests cut");
        assert_eq!(tier.version_of(node), "2.0");

        if let Some(slow) = slow.take() {
            let (status, finished) = slow.join().unwrap();
            assert_eq!(status, 200, "the slow request in flight at drain start");
            let drained_at =
                cycle_started + Duration::from_millis(report["drained_ms"].as_u64().unwrap());
            assert!(
                drained_at + Duration::from_millis(100) >= finished,
                "drained {:?} before the slow request finished",
                finished.saturating_duration_since(drained_at)
            );
            assert!(
                drained_at <= finished + Duration::from_secs(1),
                "drain finished {:?} after the slow request",
                drained_at - finished
            );
            assert!(report["at_drain_start"]["in_flight"].as_u64().unwrap() >= 1);
        }
    }
    for lb in &tier.lbs {
        for node in ["node1", "node2"] {
            assert!(lb.status(node).starts_with("UP"), "{node} back in rotation");
        }
    }

    let result = load.finish(Duration::from_secs(60));
    eprintln!("load: {result:?}");
    assert!(result.total >= 3000, "too little load: {result:?}");
    assert_eq!(
        result.errors, 0,
        "failed requests: {}",
        result.summary["errorDistribution"]
    );
    assert_eq!(
        result.non_2xx, 0,
        "non-2xx: {}",
        result.summary["statusCodeDistribution"]
    );
}

#[test]
fn a_load_balancer_that_was_down_learns_the_state_from_agent_check() {
    let tier = tier("");
    // lb2 is down before the cycle starts.
    let mut lbs = tier.lbs;
    let mut lb2 = lbs.pop().unwrap();
    lb2.process.signal(nix::sys::signal::Signal::SIGKILL);
    lb2.process.wait(Duration::from_secs(5));
    // node1's restart takes a while, long enough to bring lb2 back mid-cycle.
    std::fs::write(tier.topology.host("node1").dir.join("restart-delay"), "4").unwrap();
    std::fs::write(tier.topology.host("node1").dir.join("version"), "2.0").unwrap();

    let cycle = std::thread::spawn({
        let socket = tier.agents[0].socket.clone();
        move || {
            let out = std::process::Command::new(drain_agent_tests::agent_binary())
                .args(["cycle", "api", "--json", "--control-socket"])
                .arg(socket)
                .output()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            )
        }
    });
    wait_until(Duration::from_secs(10), "node1 restarting", || {
        tier.agents[0].backend("api")["state"] == "restarting"
    });
    let lb2_host = tier.topology.host("lb2");
    let nodes = [tier.topology.host("node1"), tier.topology.host("node2")];
    let lb2 = Haproxy::start(lb2_host, &haproxy_config(lb2_host, &nodes));
    wait_until(
        Duration::from_secs(3),
        "lb2 to put node1 in MAINT via agent-check",
        || lb2.status("node1").starts_with("MAINT"),
    );
    // Requests through lb2 while node1 restarts all go to node2.
    for _ in 0..20 {
        let addr = lb2_host.addr(FRONTEND_PORT);
        let status = tier
            .topology
            .host("client")
            .netns
            .run(move || Connection::connect(addr).unwrap().get("/").unwrap().status);
        assert_eq!(status, 200);
    }
    assert_eq!(
        lb2.stat("node1", "stot"),
        "0",
        "lb2 sent a connection to the restarting node1"
    );

    let (code, stdout) = cycle.join().unwrap();
    assert_eq!(code, Some(0), "{stdout}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let lb2_report = report["load_balancers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|lb| lb["name"] == "lb2")
        .unwrap()
        .clone();
    assert!(
        lb2_report["ready_confirmed_ms"].is_u64(),
        "lb2 reachable again by the end: {lb2_report}"
    );
    for lb in [&lb2, &lbs[0]] {
        wait_until(Duration::from_secs(3), "node1 UP on both LBs", || {
            lb.status("node1") == "UP"
        });
    }
}

#[test]
fn a_restart_that_never_gets_healthy_rolls_back_and_leaves_the_server_in_maint() {
    let marker_dir = drain_agent_tests::TempDir::new("rollback");
    let marker = marker_dir.path().join("rollback-ran");
    let tier = tier(&format!(
        "rollback = {{ command = [\"touch\", \"{}\"] }}",
        marker.display()
    ));
    std::fs::write(tier.node("node1").dir.join("version"), "broken").unwrap();
    let outcome = tier.agents[0].cli(&["cycle", "api"]);
    assert_eq!(outcome.code, Some(5), "{outcome:?}");
    assert!(marker.exists(), "the rollback command did not run");
    assert!(
        outcome.stderr.contains("left in MAINT on lb1, lb2")
            && outcome.stderr.contains("drain-agent resume api"),
        "{}",
        outcome.stderr
    );
    for lb in &tier.lbs {
        assert!(
            lb.status("node1").starts_with("MAINT"),
            "node1 on an LB: {}",
            lb.status("node1")
        );
        assert_eq!(lb.status("node2"), "UP");
    }
    let backend = tier.agents[0].backend("api");
    assert_eq!(backend["state"], "failed");
    assert!(
        backend["reason"].as_str().unwrap().contains("not healthy"),
        "{backend}"
    );
    // Still failed a while later: the agent-check keeps it in MAINT.
    std::thread::sleep(Duration::from_secs(1));
    assert!(tier.lbs[0].status("node1").starts_with("MAINT"));
}

#[test]
fn refusals_change_nothing() {
    let tier = tier("");
    // min_serving: node2 is in MAINT, so draining node1 would leave nothing UP.
    tier.lbs[0].command("set server api/node2 state maint");
    let outcome = tier.agents[0].cli(&["cycle", "api"]);
    assert_eq!(outcome.code, Some(3), "{outcome:?}");
    assert!(
        outcome.stderr.contains("api/node2 is MAINT"),
        "{}",
        outcome.stderr
    );
    assert!(
        outcome.stderr.contains("min_serving = 1"),
        "{}",
        outcome.stderr
    );
    for lb in &tier.lbs {
        assert_eq!(lb.status("node1"), "UP", "nothing may change on a refusal");
    }
    assert_eq!(tier.agents[0].backend("api")["state"], "serving");
    tier.lbs[0].command("set server api/node2 state ready");

    // Unknown backend name on the CLI.
    let outcome = tier.agents[0].cli(&["drain", "nova"]);
    assert_eq!(outcome.code, Some(2), "{outcome:?}");
    assert!(
        outcome.stderr.contains("no backend named `nova`"),
        "{}",
        outcome.stderr
    );

    // A second operation while one runs.
    std::fs::write(tier.node("node1").dir.join("restart-delay"), "3").unwrap();
    let socket = tier.agents[0].socket.clone();
    let running = std::thread::spawn(move || {
        std::process::Command::new(drain_agent_tests::agent_binary())
            .args(["cycle", "api", "--control-socket"])
            .arg(socket)
            .output()
            .unwrap()
    });
    wait_until(Duration::from_secs(10), "the cycle to run", || {
        tier.agents[0].status()["running"] == "cycle api"
    });
    let outcome = tier.agents[0].cli(&["drain", "api"]);
    assert_eq!(outcome.code, Some(3), "{outcome:?}");
    assert!(
        outcome.stderr.contains("`cycle api` is already running"),
        "{}",
        outcome.stderr
    );
    assert!(running.join().unwrap().status.success());
}

#[test]
fn a_wrong_haproxy_server_name_or_a_missing_socket_is_a_clear_error() {
    let topology = Topology::new(&["lb1", "node1", "node2"]);
    let (lb, node1, node2) = (
        topology.host("lb1"),
        topology.host("node1"),
        topology.host("node2"),
    );
    start_api(node1, "1.0");
    start_api(node2, "1.0");
    let haproxy = Haproxy::start(lb, &haproxy_config(lb, &[node1, node2]));

    // The server is called node1 in HAProxy; this agent says nodeX.
    let config = |server: &str, lbs: &str, agent_check: bool| {
        format!(
            "interfaces = [\"eth0\"]\ncontrol_socket = \"{socket}\"\n{check}\n{lbs}\n\
             [[backend]]\nname = \"api\"\nports = [{API_PORT}]\n\
             haproxy = {{ backend = \"api\", server = \"{server}\" }}\n\
             restart = {{ command = [\"true\"] }}\n",
            socket = node1.dir.join("control.sock").display(),
            check = if agent_check {
                "agent_check_listen = \"0.0.0.0:9500\""
            } else {
                ""
            },
        )
    };
    let lb1 = format!(
        "[[load_balancer]]\nname = \"lb1\"\nruntime_api = \"unix:{}\"\n",
        haproxy.socket.display()
    );
    let path = node1.dir.join("agent.toml");
    std::fs::write(&path, config("nodeX", &lb1, true)).unwrap();
    let expected = "load balancer lb1: HAProxy has no server `nodeX` in backend `api`";
    // check-config finds it, and `run` refuses to start with it.
    for command in ["check-config", "run"] {
        let mut run = node1.netns.command(drain_agent_tests::agent_binary());
        run.arg(command);
        if command == "run" {
            run.arg("--config");
        }
        let out = run.arg(&path).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(2), "{command}: {text}");
        assert!(text.contains(expected), "{command}: {text}");
    }
    assert!(
        !node1.dir.join("control.sock").exists(),
        "a refused run must not serve"
    );

    // A second load balancer whose socket does not exist, and no agent-check to fall back on.
    let lbs = format!(
        "{lb1}\n[[load_balancer]]\nname = \"lb2\"\nruntime_api = \"unix:/nonexistent/admin.sock\"\n"
    );
    let agent = drain_agent_tests::start_agent_with_config(
        &node1.netns,
        &node1.dir,
        &config("node1", &lbs, false),
    );
    let outcome = agent.cli(&["cycle", "api"]);
    assert_eq!(outcome.code, Some(3), "{outcome:?}");
    assert!(
        outcome.stderr.contains(
            "load balancer lb2: cannot reach the runtime API at unix:/nonexistent/admin.sock"
        ),
        "{}",
        outcome.stderr
    );
    assert_eq!(haproxy.status("node1"), "UP", "lb1 must be left untouched");
    assert_eq!(agent.backend("api")["state"], "serving");
}

#[test]
fn drain_wait_resume_timeout_and_cancel() {
    let tier = tier("drain_timeout = \"1500ms\"\non_timeout = \"abort\"");
    let agent = &tier.agents[0];

    // drain --wait: returns drained, the server in MAINT on both LBs; resume puts it back.
    let outcome = agent.cli(&["drain", "api", "--wait", "--json"]);
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert_eq!(outcome.json()["phase"], "drained");
    tier.assert_everywhere("node1", "MAINT");
    assert_eq!(agent.backend("api")["state"], "drained");
    let outcome = agent.cli(&["resume", "api"]);
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    tier.assert_everywhere("node1", "UP");

    // A request outliving drain_timeout with on_timeout = "abort": exit 4, back in service.
    let slow = tier.slow_request_to_node1(4000);
    wait_until(Duration::from_secs(2), "the slow request on node1", || {
        agent.count("api", "in_flight") == 1
    });
    let outcome = agent.cli(&["drain", "api", "--wait", "--json"]);
    assert_eq!(outcome.code, Some(4), "{outcome:?}");
    let report = outcome.json();
    assert_eq!(report["outcome"], "drain-timeout");
    assert_eq!(report["phase"], "serving");
    tier.assert_everywhere("node1", "UP");
    assert_eq!(
        slow.join().unwrap(),
        200,
        "an aborted drain must not cut the request"
    );

    // drain without --wait returns once the LBs confirmed; resume cancels the running drain.
    let keep_busy = tier.slow_request_to_node1(1200);
    wait_until(Duration::from_secs(2), "the request on node1", || {
        agent.count("api", "in_flight") == 1
    });
    let outcome = agent.cli(&["drain", "api"]);
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert!(outcome.stdout.contains("draining"), "{}", outcome.stdout);
    assert_eq!(agent.backend("api")["state"], "draining");
    tier.assert_everywhere("node1", "DRAIN");
    let outcome = agent.cli(&["resume", "api"]);
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert_eq!(agent.backend("api")["state"], "serving");
    assert!(agent.status()["running"].is_null());
    tier.assert_everywhere("node1", "UP");
    assert_eq!(keep_busy.join().unwrap(), 200);
}

/// Runs a PromQL query against Prometheus in `netns` and returns `data.result`.
fn promql(netns: &drain_agent_tests::Netns, path: &str, query: &str, extra: &[&str]) -> Value {
    let mut command = netns.command("curl");
    command
        .args(["-sf", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:9090/api/v1/{path}"))
        .args(["--data-urlencode", &format!("query={query}")])
        .args(extra);
    let out = command.output().unwrap();
    let body: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    body["data"]["result"].clone()
}

#[test]
fn prometheus_sees_the_phase_change_and_in_flight_falling_to_zero() {
    let topology_tier = tier_with("", "metrics_listen = \"0.0.0.0:9477\"");
    let tier = &topology_tier;
    let client = tier.topology.host("client");
    let node1 = tier.node("node1");
    let config = format!(
        "global:\n  scrape_interval: 250ms\n  scrape_timeout: 200ms\n\
         scrape_configs:\n  - job_name: drain-agent\n    static_configs:\n      - targets: ['{}:9477']\n",
        node1.v4
    );
    std::fs::write(client.dir.join("prometheus.yml"), config).unwrap();
    let log = std::fs::File::create(client.dir.join("prometheus.log")).unwrap();
    let mut command = client.netns.command("prometheus");
    command
        .arg(format!(
            "--config.file={}",
            client.dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            client.dir.join("tsdb").display()
        ))
        .arg("--web.listen-address=127.0.0.1:9090")
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let _prometheus = drain_agent_tests::Process::spawn("prometheus", &mut command);
    wait_until(
        Duration::from_secs(30),
        "Prometheus to scrape the agent",
        || promql(&client.netns, "query", "up{job=\"drain-agent\"}", &[])[0]["value"][1] == "1",
    );

    // A slow request is in flight when the drain starts; the drain waits for it.
    let slow = tier.slow_request_to_node1(2500);
    wait_until(Duration::from_secs(3), "the request in flight", || {
        tier.agents[0].count("api", "in_flight") == 1
    });
    std::thread::sleep(Duration::from_millis(700)); // a few scrapes with in-flight 1, serving
    let outcome = tier.agents[0].cli(&["drain", "api", "--wait"]);
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert_eq!(slow.join().unwrap(), 200);
    std::thread::sleep(Duration::from_millis(1000)); // scrapes after the drain
    assert_eq!(tier.agents[0].cli(&["resume", "api"]).code, Some(0));

    let series = |query: &str| -> Vec<f64> {
        let result = promql(&client.netns, "query", &format!("{query}[30s]"), &[]);
        result[0]["values"]
            .as_array()
            .unwrap_or_else(|| panic!("no samples for {query}: {result}"))
            .iter()
            .map(|pair| pair[1].as_str().unwrap().parse().unwrap())
            .collect()
    };
    let in_flight = series("drain_agent_connections{backend=\"api\",state=\"in_flight\"}");
    let first_busy = in_flight
        .iter()
        .position(|v| *v >= 1.0)
        .expect("in-flight 1 was scraped");
    assert!(
        in_flight[first_busy..].contains(&0.0),
        "in-flight never fell to 0 after {first_busy}: {in_flight:?}"
    );
    let draining = series("drain_agent_backend_phase{backend=\"api\",phase=\"draining\"}");
    let drained = series("drain_agent_backend_phase{backend=\"api\",phase=\"drained\"}");
    let serving = series("drain_agent_backend_phase{backend=\"api\",phase=\"serving\"}");
    assert!(
        draining.contains(&1.0),
        "draining never scraped: {draining:?}"
    );
    assert!(drained.contains(&1.0), "drained never scraped: {drained:?}");
    assert_eq!(serving.first(), Some(&1.0), "{serving:?}");
    let drains = promql(
        &client.netns,
        "query",
        "drain_agent_operations_total{operation=\"drain\",outcome=\"ok\"}",
        &[],
    );
    assert_eq!(drains[0]["value"][1], "1", "{drains}");
    // The agent started before HAProxy; its next reachability check sees both up.
    wait_until(
        Duration::from_secs(15),
        "both load balancers reachable",
        || {
            promql(
                &client.netns,
                "query",
                "min(drain_agent_load_balancer_up)",
                &[],
            )[0]["value"][1]
                == "1"
        },
    );
}

#[test]
fn sigterm_during_a_drain_puts_the_server_back_and_says_so() {
    let mut tier = tier("");
    let slow = tier.slow_request_to_node1(3000);
    let agent = &tier.agents[0];
    wait_until(Duration::from_secs(3), "the request in flight", || {
        agent.count("api", "in_flight") == 1
    });
    assert_eq!(agent.cli(&["drain", "api"]).code, Some(0));
    tier.assert_everywhere("node1", "DRAIN");
    agent.process.signal(nix::sys::signal::Signal::SIGTERM);
    let status = tier.agents[0].process.wait(Duration::from_secs(10));
    assert!(status.success(), "the agent's exit: {status}");
    let log = tier.agents[0].log();
    assert!(
        log.contains(
            "on_shutdown = \"abort\": stopping the drain and putting the server back in service"
        ),
        "{log}"
    );
    tier.assert_everywhere("node1", "UP");
    assert_eq!(
        slow.join().unwrap(),
        200,
        "the request in flight must finish"
    );
}

#[test]
fn a_resume_that_cancelled_a_drain_does_not_cancel_the_next_one() {
    let tier = tier("drain_timeout = \"20s\"");
    let agent = &tier.agents[0];
    let first = tier.slow_request_to_node1(1500);
    wait_until(
        Duration::from_secs(2),
        "the first request in flight",
        || agent.count("api", "in_flight") == 1,
    );
    assert_eq!(agent.cli(&["drain", "api"]).code, Some(0));
    let resumed = agent.cli(&["resume", "api"]);
    assert_eq!(resumed.code, Some(0), "{resumed:?}");
    assert_eq!(first.join().unwrap(), 200);

    // A new drain with a request in flight must wait for it, not end "cancelled by resume".
    let second = tier.slow_request_to_node1(2000);
    wait_until(
        Duration::from_secs(2),
        "the second request in flight",
        || agent.count("api", "in_flight") == 1,
    );
    let started = Instant::now();
    let outcome = agent.cli(&["drain", "api", "--wait", "--json"]);
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    let report = outcome.json();
    assert_eq!(report["outcome"], "ok", "{report}");
    assert_eq!(report["phase"], "drained", "{report}");
    assert_eq!(second.join().unwrap(), 200);
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "the drain ended after {:?}, before the request in flight",
        started.elapsed()
    );
    assert_eq!(agent.cli(&["resume", "api"]).code, Some(0));
}

#[test]
fn restart_output_with_a_multibyte_character_at_the_cut_rolls_back_in_words() {
    // 499 ASCII bytes and then `é` (2 bytes) on stderr: a byte cut at 500 splits it.
    let tier = tier(
        "restart = { command = [\"sh\", \"-c\", \"printf '%0499d' 0 >&2; printf '\\\\303\\\\251' >&2; exit 1\"] }\n\
         rollback = { command = [\"true\"] }",
    );
    let agent = &tier.agents[0];
    let outcome = agent.cli(&["cycle", "api"]);
    assert_eq!(outcome.code, Some(6), "{outcome:?}");
    assert!(
        outcome.stderr.contains("restart failed")
            && outcome.stderr.contains("rolled back")
            && !outcome.stderr.contains("Progress {"),
        "{}",
        outcome.stderr
    );
    let backend = agent.backend("api");
    assert_eq!(backend["state"], "serving", "{backend}");
    assert!(
        !agent.log().contains("panicked"),
        "the agent panicked:\n{}",
        agent.log()
    );
    tier.assert_everywhere("node1", "UP");
}

#[test]
fn on_shutdown_finish_is_bounded_by_shutdown_timeout() {
    let mut tier = tier_with("", "on_shutdown = \"finish\"\nshutdown_timeout = \"1s\"");
    let slow = tier.slow_request_to_node1(6000);
    wait_until(Duration::from_secs(3), "the request in flight", || {
        tier.agents[0].count("api", "in_flight") == 1
    });
    assert_eq!(tier.agents[0].cli(&["drain", "api"]).code, Some(0));
    let signalled = Instant::now();
    tier.agents[0]
        .process
        .signal(nix::sys::signal::Signal::SIGTERM);
    let status = tier.agents[0].process.wait(Duration::from_secs(15));
    let took = signalled.elapsed();
    assert!(status.success(), "the agent's exit: {status}");
    assert!(
        took < Duration::from_secs(5),
        "the agent took {took:?} to stop with shutdown_timeout = 1s"
    );
    let log = tier.agents[0].log();
    assert!(log.contains("shutdown_timeout passed"), "{log}");
    tier.assert_everywhere("node1", "UP");
    assert_eq!(
        slow.join().unwrap(),
        200,
        "the request in flight must finish"
    );
}
