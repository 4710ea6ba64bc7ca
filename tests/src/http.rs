//! A plain HTTP/1.1 keep-alive client over one TCP connection, so tests control exactly which
//! connection carries which request and when bytes are read.

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    time::Duration,
};

/// One connection to the API.
pub struct Connection {
    reader: BufReader<TcpStream>,
}

/// A response's status line and headers; the body is read separately or discarded.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_length: u64,
    pub version: Option<String>,
    pub body: Vec<u8>,
}

impl Connection {
    pub fn connect(addr: SocketAddr) -> io::Result<Connection> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            reader: BufReader::new(stream),
        })
    }

    pub fn stream(&self) -> &TcpStream {
        self.reader.get_ref()
    }

    /// Sends a GET without waiting for the answer.
    pub fn send(&mut self, path: &str) -> io::Result<()> {
        self.send_with(path, "")
    }

    /// Sends a GET asking the server to close the connection after answering.
    pub fn send_closing(&mut self, path: &str) -> io::Result<()> {
        self.send_with(path, "Connection: close\r\n")
    }

    /// Sends a request written out in full.
    pub fn send_raw(&mut self, request: &str) -> io::Result<()> {
        self.reader.get_mut().write_all(request.as_bytes())
    }

    fn send_with(&mut self, path: &str, headers: &str) -> io::Result<()> {
        let request = format!("GET {path} HTTP/1.1\r\nHost: api\r\n{headers}\r\n");
        self.reader.get_mut().write_all(request.as_bytes())
    }

    /// Reads the status line and headers of the next response.
    pub fn read_head(&mut self) -> io::Result<Response> {
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, format!("status line {line:?}"))
            })?;
        let mut response = Response {
            status,
            content_length: 0,
            version: None,
            body: Vec::new(),
        };
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let line = line.trim_end();
            if line.is_empty() {
                return Ok(response);
            }
            if let Some((name, value)) = line.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    response.content_length = value.parse().unwrap_or(0);
                } else if name.eq_ignore_ascii_case("x-api-version") {
                    response.version = Some(value.to_string());
                }
            }
        }
    }

    /// Reads and discards up to `limit` body bytes; returns how many.
    pub fn read_body(&mut self, limit: u64) -> io::Result<u64> {
        io::copy(&mut (&mut self.reader).take(limit), &mut io::sink())
    }

    /// Reads a whole response.
    pub fn read_response(&mut self) -> io::Result<Response> {
        let mut response = self.read_head()?;
        (&mut self.reader)
            .take(response.content_length)
            .read_to_end(&mut response.body)?;
        Ok(response)
    }

    /// Sends a GET and reads the whole response.
    pub fn get(&mut self, path: &str) -> io::Result<Response> {
        self.send(path)?;
        self.read_response()
    }

    /// Closes with RST instead of FIN (SO_LINGER 0).
    pub fn reset(self) {
        let stream = self.reader.into_inner();
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        drop(stream);
    }

    /// Closes our sending side (FIN) and keeps reading possible.
    pub fn shutdown_write(&self) -> io::Result<()> {
        self.stream().shutdown(Shutdown::Write)
    }
}
