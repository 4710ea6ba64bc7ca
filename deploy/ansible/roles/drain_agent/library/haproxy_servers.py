#!/usr/bin/python3
"""Ansible module: every server of an HAProxy backend and its status, per load balancer."""

import csv
import io
import socket

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: haproxy_servers
short_description: Read an HAProxy backend's servers from each load balancer's runtime API
description:
  - Sends C(show stat -1 4 -1) to every runtime API (C(tcp:HOST:PORT) or C(unix:PATH)) from
    the managed node, the way drain-agent reaches them, and returns each server's status.
  - Changes nothing.
options:
  load_balancers:
    description: The load balancers, as in drain_agent_load_balancers (name, runtime_api).
    type: list
    required: true
  backend:
    description: The HAProxy backend's name.
    type: str
    required: true
  timeout:
    description: Seconds one runtime API may take to answer.
    type: float
    default: 5
"""

RETURN = r"""
load_balancers:
  description: Per load balancer, its name, the servers' statuses, or the error reaching it.
  type: list
  returned: always
  sample: [{"name": "lb1", "servers": {"api1": "UP", "api2": "DRAIN"}, "error": null}]
"""


def connect(runtime_api, timeout):
    kind, _, where = runtime_api.partition(":")
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(where)
        return sock
    if kind == "tcp":
        host, _, port = where.rpartition(":")
        return socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    raise ValueError(f"runtime_api {runtime_api!r} is neither tcp:HOST:PORT nor unix:PATH")


def servers(runtime_api, backend, timeout):
    with connect(runtime_api, timeout) as sock:
        sock.sendall(b"show stat -1 4 -1\n")
        answer = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    rows = csv.reader(io.StringIO(answer.decode().lstrip("# ")))
    header = next(rows, [])
    if "pxname" not in header or "status" not in header:
        raise ValueError(f"not a show stat answer: {answer[:200]!r}")
    name, server, status = (header.index(c) for c in ("pxname", "svname", "status"))
    return {row[server]: row[status] for row in rows if len(row) > status and row[name] == backend}


def main():
    module = AnsibleModule(
        argument_spec={
            # Dicts (name, runtime_api); not declared as such, so that a templated list passes
            # ansible-lint's argument check.
            "load_balancers": {"type": "list", "required": True},
            "backend": {"type": "str", "required": True},
            "timeout": {"type": "float", "default": 5},
        },
        supports_check_mode=True,
    )
    result = []
    for lb in module.params["load_balancers"]:
        entry = {"name": lb.get("name"), "servers": {}, "error": None}
        try:
            entry["servers"] = servers(lb["runtime_api"], module.params["backend"], module.params["timeout"])
        except (OSError, ValueError, KeyError) as err:
            entry["error"] = f"{lb.get('runtime_api')}: {err}"
        result.append(entry)
    module.exit_json(changed=False, load_balancers=result)


if __name__ == "__main__":
    main()
