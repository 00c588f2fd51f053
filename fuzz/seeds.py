#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets whose entries live in corral::fuzzing (fuzz/corpus/<target>/).

Seeds are small valid inputs in each entry's framing (see src/fuzzing.rs): PXE, iPXE and UEFI HTTP-boot DHCP
exchanges with the options firmware really sends (53, 55, 57, 60, 77, 93, 94, 97, 175, ...), TFTP RRQs with
blksize/tsize/timeout/windowsize and the ACK/ERROR sequences of a transfer, HTTP request targets and Range
headers, agent JSON, and the example policy/config TOML from docs/ and the tests. Run from the repository
root: python3 fuzz/seeds.py
"""

import hashlib
import json
import os
import re
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def put(target, data, name=None):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    name = name or "seed-" + hashlib.sha1(data).hexdigest()[:16]
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def frame(header, payload):
    return bytes([header]) + struct.pack(">H", len(payload)) + payload


# ---------------------------------------------------------------------------------------------- DHCP

COOKIE = bytes([99, 130, 83, 99])
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = 1, 2, 3, 4, 5, 6, 7, 8


def opt(code, value):
    return bytes([code, len(value)]) + value


def bootp(mac, xid, opts, ciaddr=b"\0" * 4, giaddr=b"\0" * 4, broadcast=True):
    hdr = struct.pack(">BBBBIHH", 1, 1, 6, 0, xid, 4, 0x8000 if broadcast else 0)
    hdr += ciaddr + b"\0" * 4 + b"\0" * 4 + giaddr
    hdr += mac + b"\0" * 10 + b"\0" * 64 + b"\0" * 128
    body = hdr + COOKIE + b"".join(opts) + b"\xff"
    return body + b"\0" * max(0, 300 - len(body))


def ip(s):
    return bytes(int(x) for x in s.split("."))


UUID = bytes([0]) + bytes(range(16))
PRL = bytes([1, 3, 6, 12, 15, 28, 43, 60, 66, 67, 97, 119, 121, 128, 129, 130, 175, 203])


def pxe_opts(msg_type, arch, vendor, extra=()):
    return [
        opt(53, bytes([msg_type])),
        opt(57, struct.pack(">H", 1472)),
        opt(93, struct.pack(">H", arch)),
        opt(94, bytes([1, 3, 16])),
        opt(97, UUID),
        opt(60, vendor),
        opt(55, PRL),
        *extra,
    ]


def vendor(arch):
    return b"PXEClient:Arch:%05d:UNDI:003016" % arch


def dhcp_seeds():
    exchanges = []
    for last, arch in [(1, 0), (2, 7), (3, 9), (4, 6), (5, 11)]:
        mac = bytes([0x52, 0x54, 0, 0, 0, last])
        xid = 0x1000 + last
        d = bootp(mac, xid, pxe_opts(DISCOVER, arch, vendor(arch)))
        r = bootp(mac, xid, pxe_opts(REQUEST, arch, vendor(arch),
                                      [opt(50, ip("10.77.0.100")), opt(54, ip("10.77.0.1"))]))
        # PXE firmware: DISCOVER, REQUEST; ProxyDHCP: the PXE request to 4011 from the address.
        pxe = bootp(mac, xid, pxe_opts(REQUEST, arch, vendor(arch)), ciaddr=ip("10.77.0.100"),
                    broadcast=False)
        exchanges.append(frame(0, d) + frame(0, r) + frame(0x21, pxe))
        # iPXE after the chainload: user class iPXE (77), option 175 with its feature flags.
        ipxe_extra = [opt(77, b"iPXE"), opt(175, bytes([0x13, 1, 1, 0x11, 1, 1, 0x19, 1, 1]))]
        d2 = bootp(mac, xid + 0x100, pxe_opts(DISCOVER, arch, vendor(arch), ipxe_extra))
        r2 = bootp(mac, xid + 0x100, pxe_opts(REQUEST, arch, vendor(arch), ipxe_extra +
                                              [opt(50, ip("10.77.0.100")), opt(54, ip("10.77.0.1"))]))
        exchanges.append(frame(0, d2) + frame(2, r2))
    # UEFI HTTP boot (arch 16, HTTPClient).
    mac = bytes([0x52, 0x54, 0, 0, 0, 6])
    http = b"HTTPClient:Arch:00016:UNDI:003001"
    exchanges.append(frame(0, bootp(mac, 0x2000, pxe_opts(DISCOVER, 16, http)))
                     + frame(0, bootp(mac, 0x2000, pxe_opts(REQUEST, 16, http, [opt(50, ip("10.77.0.101"))]))))
    # An ordinary client with a hostname and client id: DORA, renew, decline, release.
    mac = bytes([0x52, 0x54, 0, 0, 0, 8])
    base = [opt(61, b"\x01" + mac), opt(12, b"worker-8"), opt(55, bytes([1, 3, 6, 15]))]
    exchanges.append(
        frame(0, bootp(mac, 0x3000, [opt(53, bytes([DISCOVER]))] + base))
        + frame(0, bootp(mac, 0x3000, [opt(53, bytes([REQUEST])), opt(50, ip("10.77.0.102")),
                                       opt(54, ip("10.77.0.1"))] + base))
        + frame(0x08, bootp(mac, 0x3001, [opt(53, bytes([REQUEST]))] + base, ciaddr=ip("10.77.0.102"),
                            broadcast=False))
        + frame(0, bootp(mac, 0x3002, [opt(53, bytes([DECLINE])), opt(50, ip("10.77.0.102")),
                                       opt(54, ip("10.77.0.1"))] + base))
        + frame(0x0e, bootp(mac, 0x3003, [opt(53, bytes([RELEASE])), opt(54, ip("10.77.0.1"))] + base,
                            ciaddr=ip("10.77.0.102")))
        + frame(0, bootp(mac, 0x3004, [opt(53, bytes([INFORM]))] + base, ciaddr=ip("10.77.0.102")))
    )
    # A relayed DISCOVER (giaddr), one choosing another server, a slot node with a fixed address.
    mac = bytes([0x52, 0x54, 0, 0, 0, 0x0a])
    exchanges.append(frame(0, bootp(mac, 0x4000, pxe_opts(DISCOVER, 7, vendor(7)), giaddr=ip("10.77.0.254"))))
    exchanges.append(frame(0, bootp(mac, 0x4001, pxe_opts(REQUEST, 7, vendor(7),
                                                          [opt(50, ip("10.77.0.100")),
                                                           opt(54, ip("10.9.9.9"))]))))
    exchanges.append(frame(0x10, bootp(mac, 0x4002, pxe_opts(DISCOVER, 0, vendor(0))))
                     + frame(0x10, bootp(mac, 0x4002, pxe_opts(REQUEST, 0, vendor(0),
                                                               [opt(50, ip("10.77.0.60"))]))))
    # Many strangers exhaust the 5-address pool; a known node (even MAC) reclaims one.
    flood = b"".join(frame(0, bootp(bytes([0x02, 0, 0, 0, 1, 2 * i + 1]), 0x5000 + i,
                                    [opt(53, bytes([DISCOVER]))])) for i in range(7))
    exchanges.append(flood + frame(0, bootp(bytes([0x52, 0x54, 0, 0, 0, 0x0c]), 0x5100,
                                            pxe_opts(DISCOVER, 7, vendor(7)))))
    for e in exchanges:
        put("dhcp", e)


# ---------------------------------------------------------------------------------------------- TFTP

def rrq(name, mode=b"octet", opts=()):
    b = struct.pack(">H", 1) + name + b"\0" + mode + b"\0"
    for k, v in opts:
        b += k + b"\0" + v + b"\0"
    return b


def ack(n):
    return struct.pack(">HH", 4, n & 0xFFFF)


def err(code, msg):
    return struct.pack(">HH", 5, code) + msg + b"\0"


def tftp_seeds():
    rrqs = [
        rrq(b"undionly.kpxe"),
        rrq(b"snponly.efi", opts=[(b"blksize", b"1468"), (b"tsize", b"0")]),
        rrq(b"/ipxe.efi", b"netascii", [(b"tsize", b"0"), (b"blksize", b"1428"), (b"windowsize", b"4")]),
        rrq(b"boot\\x64\\wdsnbp.com", opts=[(b"BLKSIZE", b"65464"), (b"timeout", b"2"), (b"windowsize", b"64")]),
        rrq(b"undionly.kpxe", opts=[(b"blksize", b"8"), (b"timeout", b"0"), (b"windowsize", b"0"), (b"x", b"y")]),
    ]
    packets = rrqs + [
        struct.pack(">H", 2) + b"upload.img\0octet\0",
        ack(0), ack(1), ack(65535),
        struct.pack(">HH", 3, 1) + b"data" * 10,
        err(0, b"Transfer cancelled"), err(8, b"option refused"),
        struct.pack(">H", 6) + b"blksize\x001428\x00tsize\x0012345\x00",
    ]
    for p in packets:
        put("tftp_packet", p)

    def transfer(size, small, first, events):
        return struct.pack(">H", size) + bytes([small]) + frame(0, first) + b"".join(events)

    pk = lambda p, dt=0: frame(dt << 1, p)
    timeout = lambda dt=10: frame(dt << 1 | 1, b"")
    seeds = [
        # Lock-step 512-byte blocks, the last one short.
        transfer(1500, 0, rrqs[0], [pk(ack(1)), pk(ack(2)), pk(ack(3))]),
        # OACK, ACK 0, then blocks of 1468; a lost ACK and a retransmission.
        transfer(4000, 0, rrqs[1], [pk(ack(0)), pk(ack(1)), timeout(), pk(ack(2)), pk(ack(3))]),
        # Windowed: ACK the window's last block, one short ACK (loss), duplicates ignored.
        transfer(20000, 0, rrqs[2], [pk(ack(0)), pk(ack(4)), pk(ack(6)), pk(ack(6)), pk(ack(10)),
                                     pk(ack(14)), timeout(), pk(ack(14))]),
        transfer(60000, 1, rrqs[3], [pk(ack(0)), pk(ack(1)), pk(ack(3))]),
        # A file that is an exact multiple of the block size (an empty last block).
        transfer(1024, 0, rrqs[0], [pk(ack(1)), pk(ack(2)), pk(ack(3))]),
        transfer(0, 0, rrqs[0], [pk(ack(1))]),
        # The client gives up, or stops answering until the retries run out.
        transfer(3000, 0, rrqs[1], [pk(ack(0)), pk(err(0, b"cancelled"))]),
        transfer(3000, 1, rrqs[4], [timeout(), timeout(), timeout(), timeout(20)]),
        # Garbage from the client's TID and an ACK from the future.
        transfer(3000, 0, rrqs[0], [pk(b"\x00\x09junk"), pk(ack(77)), pk(ack(1), 5)]),
    ]
    for s in seeds:
        put("tftp_transfer", s)


# ---------------------------------------------------------------------------------------------- HTTP

def http_seeds():
    targets = [
        "/ipxe/undionly.kpxe", "/ipxe/snponly.efi", "/ipxe/sub/deeper/initrd.img", "/ipxe/a%20b%25",
        "/images/rocky9/vmlinuz", "/images/rocky9/sub/vmlinuz", "/ipxe/inside", "/ipxe/roundabout/vmlinuz",
        "/ipxe/../etc/passwd", "/ipxe/%2e%2e/secret", "/ipxe/escape", "/ipxe/outdir/secret",
        "/ipxe/up/secret", "/ipxe/slash/etc/passwd", "/ipxe/sub%2f..%2f..%2fsecret", "/ipxe//etc/passwd",
        "/images/x/..%2F..%2Fsecret", "/ipxe/sub/./vmlinuz",
        "/boot/52-54-00-00-00-01?uuid=4c4c4544-0047-3410-8058-b4c04f563532&serial=ABC%20123"
        "&manufacturer=Dell+Inc.&product=PowerEdge%20R640&buildarch=x86_64&platform=efi&memsize=65536",
        "/boot/525400000001?uuid=&serial=%00%01%7f&memsize=x",
        "/boot.ipxe", "/api/v1/events?limit=10", "/api/v1/agent/orders?wait=30",
        "http://10.77.0.1/ipxe/snponly.efi",
    ]
    ranges = ["bytes=0-1023", "bytes=100-", "bytes=-500", "bytes=0-0", "bytes= 5 - 9 ", "bytes=0-1,4-5",
              "bytes=9-3", "bytes=-0", "bytes=18446744073709551615-", "items=0-1"]
    for i, t in enumerate(targets):
        data = t.encode()
        if i < len(ranges):
            data += b"\0" + ranges[i].encode()
        put("http_request", data)


# ---------------------------------------------------------------------------------------------- agent

def agent_seeds():
    hb = {
        "load1": 0.42, "cpus": 8, "mem_total_kib": 16384000, "mem_available_kib": 12000000,
        "swap_in": 0, "swap_out": 12, "io_read_sectors": 123456, "io_write_sectors": 654321,
        "busy": False, "uptime_secs": 3600.5, "hostname": "web-01",
        "groups": [{"name": "web", "state": "running", "detail": "nginx"},
                   {"name": "db", "state": "failed", "detail": "postgres exited 1"},
                   {"name": "batch", "state": "starting", "detail": ""}],
    }
    put("agent_json", json.dumps(hb))
    put("agent_json", json.dumps({"load1": 12.0, "cpus": 2, "busy": True, "hostname": "x"}))
    put("agent_json", "{}")
    put("agent_json", json.dumps({"id": 7, "ok": True, "detail": "drained in 3 s"}))
    put("agent_json", json.dumps({"id": 8, "ok": False}))
    put("agent_json", json.dumps({"id": 7, "order": "drain", "grace_secs": 30}))
    put("agent_json", json.dumps({"id": 9, "order": "poweroff"}))
    put("agent_json", json.dumps({"interval_secs": 5}))


# ---------------------------------------------------------------------------------------------- TOML

def toml_seeds():
    docs = os.path.join(ROOT, "docs")
    put("policy_toml", open(os.path.join(docs, "policy.example.toml"), "rb").read(), "policy.example.toml")
    put("config_toml", open(os.path.join(docs, "corral.example.toml"), "rb").read(), "corral.example.toml")
    # TOML documents embedded in the tests: raw strings that look like a policy or a config.
    found = {"policy_toml": 0, "config_toml": 0}
    for d in ["src", "tests"]:
        for dirpath, _, files in os.walk(os.path.join(ROOT, d)):
            for f in files:
                if not f.endswith(".rs") or f == "fuzzing.rs":
                    continue
                text = open(os.path.join(dirpath, f), encoding="utf-8", errors="replace").read()
                for m in re.finditer(r'r#+"(.*?)"#+', text, re.S):
                    body = m.group(1)
                    if "[[cluster]]" in body or "[settings]" in body:
                        target = "policy_toml"
                    elif "[server]" in body or "[dhcp]" in body or "[tftp]" in body:
                        target = "config_toml"
                    else:
                        continue
                    if "{" in body and "format!" in text[max(0, m.start() - 40):m.start()]:
                        continue  # a format string, not TOML as written
                    found[target] += 1
                    put(target, body)
    # Configs as the integration tests write them (their format! placeholders filled in).
    for c in [
        '[server]\naddress = "127.0.0.1"\nstate_dir = "state"\nscripts_dir = "boot-scripts"\n[http]\n'
        'listen = "127.0.0.1:8080"\n[tftp]\nlisten = "0.0.0.0:6969"\nroot = "root"\n',
        '[server]\naddress = "127.0.0.1"\nstate_dir = "state"\nimages_dir = "images"\nscripts_dir = "b"\n'
        'policy = "policy.toml"\ndisks_dir = "disks"\n[http]\nlisten = "127.0.0.1:8080"\n[tftp]\nenabled = false\n'
        '[nbd]\nlisten = "127.0.0.1:10809"\nadmin_hosts = ["127.0.0.1"]\n[iscsi]\nlisten = "127.0.0.1:3260"\n'
        '[[dhcp.reservation]]\nmac = "52:54:00:00:00:01"\naddress = "127.0.0.1"\n'
        '[[dhcp.reservation]]\nmac = "52:54:00:00:00:02"\naddress = "127.0.0.2"\n',
        '[server]\ninterface = "veth0"\naddress = "10.66.1.1"\nstate_dir = "state"\nscripts_dir = "s"\n'
        '[dhcp]\nmode = "full"\nsubnet = "10.66.1.0/24"\nrange = ["10.66.1.100", "10.66.1.150"]\n'
        'router = "10.66.1.1"\ndns = ["10.66.1.1"]\nlease_time = 600\n',
        '[server]\ninterface = "br0"\n[dhcp]\nmode = "full"\nsubnet = "10.0.0.0/24"\n'
        'range = ["10.0.0.200", "10.0.1.5"]\n',
        '[server]\nadress = "10.0.0.1"\n\n[dhcp]\nmode = "full"\nlease_tme = 5\n',
        '[server]\naddress = "127.0.0.1"\npolicy = "policy.toml"\n[http]\nlisten = "127.0.0.1:1"\n'
        'api_token = "s3cret-0123456789abc"\n[tftp]\nenabled = false\n[boot]\ntrust_request_address = true\n',
    ]:
        put("config_toml", c)
    # Broken files: the diagnostics must still carry positions.
    put("policy_toml", "[settings]\ncooldwn = \"5m\"\n[[cluster]]\nname = \"web\"\nmin = \"two\"\n")
    put("config_toml", "[server]\naddress = \"10.77.0.300\"\n[dhcp]\nmode = \"fulll\"\nrange = [1]\n")
    put("config_toml", "[server\n")
    print({k: v for k, v in found.items()}, file=sys.stderr)


def dicts():
    """libFuzzer dictionaries for the TOML targets: every key and table name in the examples, and the
    tokens of TOML itself, so mutations produce files the parser gets past."""
    d = os.path.join(ROOT, "fuzz", "dict")
    os.makedirs(d, exist_ok=True)
    base = ['"="', '"["', '"]"', '"[["', '"]]"', '"{"', '"}"', '","', '"\\x22"', '"\\x0A"', '"true"',
            '"false"', '"#"', '"\\x22\\x22\\x22"', '"1d"', '"5m"', '"30s"', '"-"', '"."', '"10.77.0.1"',
            '"/24"', '"52:54:00:00:00:01"', '"1979-05-27T07:32:00Z"', '"inf"', '"nan"', '"0x"']
    for target, example in [("policy_toml", "policy.example.toml"), ("config_toml", "corral.example.toml")]:
        text = open(os.path.join(ROOT, "docs", example)).read().replace("# ", "")
        words = set(re.findall(r"^\s*\[{1,2}([\w.]+)\]{1,2}", text, re.M))
        words |= set(re.findall(r"([A-Za-z_][\w]*)\s*=", text))
        words |= set(re.findall(r'"([\w.:/-]{1,24})"', text))
        lines = base + ['"%s"' % w for w in sorted(words) if '"%s"' % w not in base]
        with open(os.path.join(d, target + ".dict"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    dicts()
    dhcp_seeds()
    tftp_seeds()
    http_seeds()
    agent_seeds()
    toml_seeds()
