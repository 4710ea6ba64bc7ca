//! HAProxy runtime API client (the "stats socket"), over a Unix socket or TCP.
//!
//! One command per connection: HAProxy answers and closes when the command does not enable
//! interactive mode, so the whole answer is "everything until EOF".

use std::{collections::HashMap, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::config::{HaproxyServer, LoadBalancer, RuntimeApi};

/// Administrative states the agent sets (`set server B/S state ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    Ready,
    Drain,
    Maint,
}

impl AdminState {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        }
    }

    /// Whether a `show stat` status shows this state. Ready means taking traffic again:
    /// HAProxy's own health check has passed ("UP", "UP 1/3") or checks are off.
    pub fn shown_by(self, status: &str) -> bool {
        match self {
            AdminState::Ready => status.starts_with("UP") || status == "no check",
            AdminState::Drain => status.starts_with("DRAIN"),
            AdminState::Maint => status.starts_with("MAINT"),
        }
    }
}

/// One server's line of `show stat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStat {
    pub name: String,
    /// "UP", "UP 1/3", "DOWN", "DRAIN", "MAINT", "MAINT (via ...)", "no check", ...
    pub status: String,
    /// Current sessions: requests being served through this server.
    pub scur: u64,
    /// Requests queued for this server.
    pub qcur: u64,
    /// Sessions since start.
    pub stot: u64,
    /// Idle pooled connections HAProxy keeps to this server (HAProxy >= 2.0).
    pub idle_conn_cur: Option<u64>,
    /// Connections in use.
    pub used_conn_cur: Option<u64>,
}

impl ServerStat {
    /// Taking traffic: up (or up without checks) and neither draining nor in maintenance.
    pub fn is_serving(&self) -> bool {
        self.status.starts_with("UP") || self.status == "no check"
    }
}

/// A failed exchange with one load balancer; every variant names it.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HaproxyError {
    #[error("load balancer {lb}: cannot reach the runtime API at {api}: {reason}")]
    Unreachable {
        lb: String,
        api: String,
        reason: String,
    },
    #[error(
        "load balancer {lb}: the runtime API at {api} did not answer within {}",
        humantime::format_duration(*.timeout)
    )]
    Timeout {
        lb: String,
        api: String,
        timeout: Duration,
    },
    #[error(
        "load balancer {lb}: HAProxy has no server `{server}` in backend `{backend}`; check \
         `haproxy = {{ backend, server }}` against `show servers state` on that load balancer"
    )]
    NoSuchServer {
        lb: String,
        backend: String,
        server: String,
    },
    #[error(
        "load balancer {lb}: HAProxy refused `{command}` for {backend}/{server}: {answer}. The \
         stats socket needs `level admin`"
    )]
    Refused {
        lb: String,
        command: String,
        backend: String,
        server: String,
        answer: String,
    },
    #[error("load balancer {lb}: unexpected answer to `{command}`: {answer}")]
    Unexpected {
        lb: String,
        command: String,
        answer: String,
    },
}

impl HaproxyError {
    /// The load balancer could not be reached at all (as opposed to refusing).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            HaproxyError::Unreachable { .. } | HaproxyError::Timeout { .. }
        )
    }
}

/// Client for one load balancer.
#[derive(Debug, Clone)]
pub struct RuntimeApiClient {
    lb: LoadBalancer,
}

impl RuntimeApiClient {
    pub fn new(lb: &LoadBalancer) -> RuntimeApiClient {
        RuntimeApiClient { lb: lb.clone() }
    }

    /// One client per configured load balancer.
    pub fn for_each(lbs: &[LoadBalancer]) -> Vec<RuntimeApiClient> {
        lbs.iter().map(RuntimeApiClient::new).collect()
    }

    pub fn name(&self) -> &str {
        &self.lb.name
    }

    /// Sends one command and returns HAProxy's whole answer.
    pub async fn command(&self, command: &str) -> Result<String, HaproxyError> {
        let timeout = self.lb.timeout;
        match tokio::time::timeout(timeout, self.exchange(command)).await {
            Ok(result) => result,
            Err(_) => Err(HaproxyError::Timeout {
                lb: self.lb.name.clone(),
                api: self.lb.runtime_api.to_string(),
                timeout,
            }),
        }
    }

    async fn exchange(&self, command: &str) -> Result<String, HaproxyError> {
        let unreachable = |err: std::io::Error| HaproxyError::Unreachable {
            lb: self.lb.name.clone(),
            api: self.lb.runtime_api.to_string(),
            reason: err.to_string(),
        };
        let line = format!("{command}\n");
        let answer = match &self.lb.runtime_api {
            RuntimeApi::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path).await;
                ask(stream.map_err(unreachable)?, &line).await
            }
            RuntimeApi::Tcp(address) => {
                let stream = tokio::net::TcpStream::connect(address.as_str()).await;
                ask(stream.map_err(unreachable)?, &line).await
            }
        }
        .map_err(unreachable)?;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }

    /// `set server B/S state ...`; HAProxy answers nothing on success.
    pub async fn set_state(
        &self,
        server: &HaproxyServer,
        state: AdminState,
    ) -> Result<(), HaproxyError> {
        let command = format!(
            "set server {}/{} state {}",
            server.backend,
            server.server,
            state.as_str()
        );
        let answer = self.command(&command).await?;
        let answer = answer.trim();
        if answer.is_empty() {
            return Ok(());
        }
        if answer.starts_with("No such") {
            return Err(self.no_such_server(server));
        }
        Err(HaproxyError::Refused {
            lb: self.lb.name.clone(),
            command,
            backend: server.backend.clone(),
            server: server.server.clone(),
            answer: answer.to_string(),
        })
    }

    /// `show stat` for every server of an HAProxy backend. Asks for all servers and filters:
    /// `show stat NAME ...` resolves NAME to the first proxy of that name, which is the
    /// frontend when a frontend and a backend share it.
    pub async fn servers(&self, backend: &str) -> Result<Vec<ServerStat>, HaproxyError> {
        let command = "show stat -1 4 -1".to_string();
        let answer = self.command(&command).await?;
        let servers =
            parse_show_stat(&answer, backend).ok_or_else(|| HaproxyError::Unexpected {
                lb: self.lb.name.clone(),
                command: command.clone(),
                answer: answer.lines().next().unwrap_or_default().to_string(),
            })?;
        Ok(servers)
    }

    /// `show stat` for one server; an error naming it when HAProxy does not know it.
    pub async fn server(&self, server: &HaproxyServer) -> Result<ServerStat, HaproxyError> {
        self.servers(&server.backend)
            .await?
            .into_iter()
            .find(|stat| stat.name == server.server)
            .ok_or_else(|| self.no_such_server(server))
    }

    fn no_such_server(&self, server: &HaproxyServer) -> HaproxyError {
        HaproxyError::NoSuchServer {
            lb: self.lb.name.clone(),
            backend: server.backend.clone(),
            server: server.server.clone(),
        }
    }
}

/// Writes one command line and reads the answer until HAProxy closes the connection.
async fn ask<S>(mut stream: S, line: &str) -> std::io::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(line.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    Ok(answer)
}

/// Parses `show stat` CSV ("# pxname,svname,qcur,..." header) into the servers of `backend`.
/// `None` when the answer is not CSV at all (an error message instead).
pub fn parse_show_stat(answer: &str, backend: &str) -> Option<Vec<ServerStat>> {
    let mut lines = answer.lines();
    let header = lines.next()?.strip_prefix("# ")?;
    let columns: HashMap<&str, usize> = header
        .split(',')
        .enumerate()
        .map(|(index, name)| (name, index))
        .collect();
    fn field<'a>(columns: &HashMap<&str, usize>, row: &[&'a str], name: &str) -> Option<&'a str> {
        columns.get(name).and_then(|&i| row.get(i).copied())
    }
    let number =
        |row: &[&str], name: &str| field(&columns, row, name).and_then(|v| v.parse::<u64>().ok());
    let mut servers = Vec::new();
    for line in lines {
        let row: Vec<&str> = line.split(',').collect();
        let (Some(pxname), Some(svname)) = (
            field(&columns, &row, "pxname"),
            field(&columns, &row, "svname"),
        ) else {
            continue;
        };
        if pxname != backend || svname == "BACKEND" || svname == "FRONTEND" {
            continue;
        }
        servers.push(ServerStat {
            name: svname.to_string(),
            status: field(&columns, &row, "status")
                .unwrap_or_default()
                .to_string(),
            scur: number(&row, "scur").unwrap_or(0),
            qcur: number(&row, "qcur").unwrap_or(0),
            stot: number(&row, "stot").unwrap_or(0),
            idle_conn_cur: number(&row, "idle_conn_cur"),
            used_conn_cur: number(&row, "used_conn_cur"),
        });
    }
    Some(servers)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOW_STAT: &str = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,ctime,rtime,ttime,agent_status,agent_code,agent_duration,check_desc,agent_desc,check_rise,check_fall,check_health,agent_rise,agent_fall,agent_health,addr,cookie,mode,algo,conn_rate,conn_rate_max,conn_tot,intercepted,dcon,dses,wrew,connect,reuse,cache_lookups,cache_hits,srv_icur,src_ilim,qtime_max,ctime_max,rtime_max,ttime_max,eint,idle_conn_cur,safe_conn_cur,used_conn_cur,need_conn_est,uweight,agg_server_status,agg_server_check_status,agg_check_status,-,ssl_sess,ssl_reused_sess,ssl_failed_handshake,h2_headers_rcvd,h2_data_rcvd,h2_settings_rcvd,h2_rst_stream_rcvd,h2_goaway_rcvd,h2_detected_conn_protocol_err,h2_detected_strm_protocol_err,h2_rst_stream_resp,h2_goaway_resp,h2_open_connections,h2_backend_open_streams,h2_total_connections,h2_backend_total_streams,h1_open_connections,h1_open_streams,h1_total_connections,h1_total_streams,h1_bytes_in,h1_bytes_out,\n\
nova-api,controller,0,0,3,5,,120,,,,0,,0,0,0,0,DRAIN,0,1,0,0,0,5,0,,1,3,1,,120,,2,0,,5,L4OK,,0,0,118,0,0,0,0,,,,,0,0,,,,,1,,,0,0,1,3,,,,Layer4 check passed,,2,3,4,,,,192.0.2.1:8774,,http,,,,,,,,0,118,2,,,0,,0,0,3,3,0,2,7,3,0,,,,,,,,,,,,,,,,,,,,,,,,,,,\n\
nova-api,apicomp,1,2,0,4,,98,,,,0,,0,0,0,0,UP,1,1,0,0,0,100,0,,1,3,2,,98,,2,0,,4,L4OK,,0,0,98,0,0,0,0,,,,,0,0,,,,,1,,,0,0,1,3,,,,Layer4 check passed,,2,3,4,,,,192.0.2.2:8774,,http,,,,,,,,0,98,0,,,0,,0,0,3,3,0,2,1,0,0,,,,,,,,,,,,,,,,,,,,,,,,,,,\n\
nova-api,BACKEND,0,0,3,5,800,218,,,,,,,0,0,0,0,UP,1,1,0,,0,100,0,,1,3,0,,218,,1,0,,5,,,,0,216,0,0,0,0,,,,216,0,0,0,0,0,0,1,,,0,0,1,3,,,,,,,,,,,,,,http,roundrobin,,,,,,,0,216,2,0,0,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,\n";

    #[test]
    fn show_stat_gives_each_servers_sessions_and_status() {
        let servers = parse_show_stat(SHOW_STAT, "nova-api").unwrap();
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[0].name, "controller");
        assert_eq!(servers[0].status, "DRAIN");
        assert_eq!(servers[0].scur, 3);
        assert_eq!(servers[0].stot, 120);
        assert_eq!(servers[0].idle_conn_cur, Some(2));
        assert!(!servers[0].is_serving());
        assert_eq!(servers[1].qcur, 1);
        assert!(servers[1].is_serving());
        assert!(parse_show_stat(SHOW_STAT, "other").unwrap().is_empty());
    }

    #[test]
    fn an_error_message_is_not_a_stat_table() {
        assert!(parse_show_stat("Unknown command.\n", "nova-api").is_none());
    }

    #[test]
    fn admin_states_match_haproxy_statuses() {
        assert!(AdminState::Drain.shown_by("DRAIN (agent)"));
        assert!(AdminState::Maint.shown_by("MAINT (via agent)"));
        assert!(AdminState::Ready.shown_by("UP"));
        assert!(AdminState::Ready.shown_by("UP 1/3"));
        assert!(!AdminState::Ready.shown_by("DOWN 1/2"));
        assert!(!AdminState::Ready.shown_by("MAINT"));
    }
}
