//! `drain-agent check-config`: everything that can be checked without acting — the file
//! itself, the node (interfaces, control group), and each load balancer (runtime API reachable,
//! HAProxy backend and server names known).

use std::path::Path;

use crate::{
    config::{Config, ConfigError},
    haproxy::{HaproxyError, RuntimeApiClient},
};

/// How bad a problem is: errors make the config unusable; warnings may be transient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem, located in the file as well as possible.
#[derive(Debug, Clone)]
pub struct Problem {
    pub severity: Severity,
    pub error: ConfigError,
}

/// Checks the file and the node; returns the config if it parses, and every problem found.
pub async fn check(path: &Path) -> (Option<Config>, Vec<Problem>) {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => {
            return (
                None,
                vec![Problem {
                    severity: Severity::Error,
                    error,
                }],
            );
        }
    };
    let mut problems = Vec::new();
    if let Err(error) = config.check_host() {
        problems.push(Problem {
            severity: Severity::Error,
            error,
        });
    }
    problems.extend(check_load_balancers(&config).await);
    (Some(config), problems)
}

/// Asks each load balancer for every configured HAProxy server. An unreachable one is a
/// warning (HAProxy may be down right now; agent-check covers it), a server it does not know
/// is an error.
pub async fn check_load_balancers(config: &Config) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (index, lb) in config.load_balancers.iter().enumerate() {
        let client = RuntimeApiClient::new(lb);
        for (backend_index, backend) in config.backends.iter().enumerate() {
            let Some(server) = &backend.haproxy else {
                continue;
            };
            match client.servers(&server.backend).await {
                Ok(servers) if servers.iter().any(|stat| stat.name == server.server) => {}
                Ok(_) => problems.push(Problem {
                    severity: Severity::Error,
                    error: config.error_at(
                        &format!("backend[{backend_index}].haproxy"),
                        HaproxyError::NoSuchServer {
                            lb: lb.name.clone(),
                            backend: server.backend.clone(),
                            server: server.server.clone(),
                        }
                        .to_string(),
                    ),
                }),
                Err(err) => {
                    problems.push(Problem {
                        severity: if err.is_unreachable() {
                            Severity::Warning
                        } else {
                            Severity::Error
                        },
                        error: config.error_at(
                            &format!("load_balancer[{index}].runtime_api"),
                            err.to_string(),
                        ),
                    });
                    break; // one message per unreachable load balancer
                }
            }
        }
    }
    problems
}
