//! Restarting (and rolling back) the API service: `systemctl restart UNIT` or a command.

use std::{process::Stdio, time::Duration};

use tokio::process::Command;

use crate::config::{Action, Step};

/// Why a restart or rollback step failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("`{command}` could not be started: {reason}")]
    Spawn {
        command: String,
        reason: std::io::Error,
    },
    #[error("`{command}` exited with {status}: {output}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        output: String,
    },
    #[error(
        "`{command}` did not finish within {} and was killed",
        humantime::format_duration(*.timeout)
    )]
    Timeout { command: String, timeout: Duration },
}

/// The command line a step runs, for messages.
pub fn describe(action: &Action) -> String {
    match action {
        Action::SystemdUnit(unit) => format!("systemctl restart {unit}"),
        Action::Command(argv) => argv.join(" "),
    }
}

/// Most bytes of a failed step's output kept for the message.
const OUTPUT_LIMIT: usize = 500;

/// Whether systemd manages this machine (the check `sd_booted()` makes).
fn systemd_is_running() -> bool {
    std::path::Path::new("/run/systemd/system").is_dir()
}

/// Runs a step to completion within its timeout; its output goes to the error on failure.
///
/// A `command` runs in a process group of its own, and under systemd in a transient scope
/// (`systemd-run --scope`) outside the agent's cgroup: stopping or restarting the agent (its
/// unit's control group, or a Ctrl-C to its process group) never kills the service it
/// started.
pub async fn run(step: &Step) -> Result<(), StepError> {
    run_with(step, |_| {}).await
}

/// [`run`], telling `started` the process group of the command once it runs (its pid: it
/// leads a group of its own), so that it can be journaled.
pub async fn run_with(step: &Step, started: impl FnOnce(Option<i32>)) -> Result<(), StepError> {
    run_with_env(step, &[], started).await
}

/// Like [`run_with`], with extra environment variables for the command.
pub async fn run_with_env(
    step: &Step,
    env: &[(&str, String)],
    started: impl FnOnce(Option<i32>),
) -> Result<(), StepError> {
    let command_line = describe(&step.action);
    let mut command = match &step.action {
        Action::SystemdUnit(unit) => {
            let mut command = Command::new("systemctl");
            command.args(["restart", unit]);
            command
        }
        Action::Command(argv) if systemd_is_running() => {
            let mut command = Command::new("systemd-run");
            command
                .args(["--scope", "--quiet", "--collect", "--"])
                .args(argv);
            command
        }
        Action::Command(argv) => {
            let mut command = Command::new(&argv[0]);
            command.args(&argv[1..]);
            command
        }
    };
    command
        .envs(env.iter().map(|(name, value)| (name, value)))
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().map_err(|reason| StepError::Spawn {
        command: command_line.clone(),
        reason,
    })?;
    started(child.id().and_then(|pid| i32::try_from(pid).ok()));
    let output = match tokio::time::timeout(step.timeout, child.wait_with_output()).await {
        Err(_) => {
            return Err(StepError::Timeout {
                command: command_line,
                timeout: step.timeout,
            });
        }
        Ok(result) => result.map_err(|reason| StepError::Spawn {
            command: command_line.clone(),
            reason,
        })?,
    };
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if text.is_empty() {
        text = String::from_utf8_lossy(&output.stdout).trim().to_string();
    }
    truncate_on_char_boundary(&mut text, OUTPUT_LIMIT);
    Err(StepError::Failed {
        command: command_line,
        status: output.status,
        output: text,
    })
}

/// Shortens `text` to at most `limit` bytes without splitting a character (String::truncate
/// panics inside one), marking the cut.
fn truncate_on_char_boundary(text: &mut String, limit: usize) {
    if text.len() <= limit {
        return;
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push('…');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_command_runs_in_a_process_group_of_its_own() {
        // The step prints its own /proc stat (field 5 is the process group) and fails, so
        // the output comes back in the error.
        let failed = run(&step(
            &["sh", "-c", "cat /proc/$$/stat >&2; exit 1"],
            Duration::from_secs(5),
        ))
        .await
        .unwrap_err();
        let StepError::Failed { output, .. } = failed else {
            panic!("unexpected: {failed}");
        };
        let after_name = output.rsplit_once(')').expect("stat line").1;
        let group: i32 = after_name
            .split_whitespace()
            .nth(2)
            .unwrap()
            .parse()
            .unwrap();
        assert_ne!(
            group,
            nix::unistd::getpgrp().as_raw(),
            "the step shares the agent's process group: {output}"
        );
    }

    #[test]
    fn output_is_cut_on_a_character_boundary() {
        let mut text = format!("{}é and more", "a".repeat(499));
        truncate_on_char_boundary(&mut text, 500);
        assert_eq!(text, format!("{}…", "a".repeat(499)));
        let mut short = "é".to_string();
        truncate_on_char_boundary(&mut short, 500);
        assert_eq!(short, "é");
    }

    fn step(argv: &[&str], timeout: Duration) -> Step {
        Step {
            action: Action::Command(argv.iter().map(|s| s.to_string()).collect()),
            timeout,
        }
    }

    #[tokio::test]
    async fn a_command_step_reports_status_output_and_deadline() {
        run(&step(&["true"], Duration::from_secs(5))).await.unwrap();
        let failed = run(&step(
            &["sh", "-c", "echo broken >&2; exit 3"],
            Duration::from_secs(5),
        ))
        .await
        .unwrap_err()
        .to_string();
        assert!(
            failed.contains("exit status: 3") && failed.contains("broken"),
            "{failed}"
        );
        let slow = run(&step(&["sleep", "5"], Duration::from_millis(100)))
            .await
            .unwrap_err();
        assert!(matches!(slow, StepError::Timeout { .. }), "{slow}");
        let missing = run(&step(&["/nonexistent/restart"], Duration::from_secs(1)))
            .await
            .unwrap_err();
        assert!(matches!(missing, StepError::Spawn { .. }), "{missing}");
    }
}
