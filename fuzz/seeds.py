#!/usr/bin/env python3
"""Writes the seed inputs of every fuzz target into fuzz/corpus/<target>/seed-*: a few valid
inputs of each kind (frames of every op, JSON lines, WebSocket messages, the example policy,
tokens), plus a few bad ones next to them. The stream targets' inputs start with three control
bytes (split point, size limit: see fuzz/src/lib.rs). Needs python3-cryptography for ES256.

    python3 fuzz/seeds.py
"""

import base64
import hashlib
import hmac
import json
import os
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")

MAGIC, VERSION = 0xC1, 1
REQUEST, PUBLISH, SUBSCRIBE, UNSUBSCRIBE, PING, CREDIT = 1, 2, 3, 4, 5, 6
REGISTER, UNREGISTER, PRESENCE_QUERY, PRESENCE_WATCH = 0x10, 0x11, 0x12, 0x13
HIGH, LOW, RETRY, STREAM, SINCE_TIME = 1, 2, 4, 0x40, 0x80

# The jwt target's keys (fuzz/fuzz_targets/jwt.rs).
SECRET = b"fuzz-secret-0123456789abcdef-0123456789"
OTHER_SECRET = b"another-secret-0123456789abcdef-01234567"
FAR = 4102444800  # 2100-01-01: the seeds stay valid


def frame(ftype, fid=0, subject=b"", aux=b"", headers=(), payload=b"", flags=0, param=0):
    block = b"".join(
        struct.pack(">H", len(n)) + n + struct.pack(">H", len(v)) + v for n, v in headers
    )
    body = (
        struct.pack(">H", len(subject)) + subject
        + struct.pack(">H", len(aux)) + aux
        + struct.pack(">I", len(block)) + block
        + payload
    )
    return struct.pack(">BBBBIQI", MAGIC, VERSION, ftype, flags, len(body), fid, param) + body


def control(split, limit):
    return struct.pack(">HB", split, limit)


def write(target, name, data):
    path = os.path.join(CORPUS, target)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "seed-" + name), "wb") as f:
        f.write(data)


FRAMES = {
    "request": frame(REQUEST, 1, b"demo.echo", payload=b"hello", param=2000),
    "request-retry-high": frame(REQUEST, 2, b"svc.a", headers=[(b"X-Trace", b"abc")],
                                payload=b"\x00\xff", flags=RETRY | HIGH),
    "publish": frame(PUBLISH, 0, b"events.a", headers=[(b"X-A", b"1"), (b"X-B", b"2"),
                                                       (b"X-A", b"3")], payload=b"x"),
    "publish-durable": frame(PUBLISH, 3, b"orders.new", payload=b"{}", flags=STREAM),
    "subscribe": frame(SUBSCRIBE, 4, b"events.>", aux=b"workers", flags=LOW, param=100),
    "subscribe-seq": frame(SUBSCRIBE, 5, b"orders.>", payload=struct.pack(">Q", 41), flags=STREAM),
    "subscribe-time": frame(SUBSCRIBE, 6, b"orders.>", payload=b"2026-12-06T05:00:00+01:00",
                            flags=STREAM | SINCE_TIME),
    "unsubscribe": frame(UNSUBSCRIBE, 4),
    "ping": frame(PING, 7),
    "credit": frame(CREDIT, 4, param=50),
    "register": frame(REGISTER, 8, b"bob"),
    "unregister": frame(UNREGISTER, 8, b"bob"),
    "presence": frame(PRESENCE_QUERY, 9, b"bob"),
    "presence-watch": frame(PRESENCE_WATCH, 10, b"team.>"),
}

LINES = {
    "request": b'{"op":"request","id":1,"subject":"demo.echo","data":"hi","timeout_ms":2000}',
    "default-op": b'{"subject":"demo.echo","data":"hi"}',
    "publish": b'{"op":"publish","subject":"events.a","data":{"k":[1,2]},"headers":{"X-A":"1","X-B":["2","3"]}}',
    "durable": b'{"op":"publish","id":"p","subject":"orders.new","data_b64":"AP8=","durable":true}',
    "subscribe": b'{"op":"subscribe","id":"s1","subject":"events.>","queue":"w","credit":10,"priority":"high"}',
    "since-seq": b'{"op":"subscribe","id":"s2","subject":"orders.>","since_seq":41}',
    "since-time": b'{"op":"subscribe","id":"s3","subject":"orders.>","since_time":"2026-12-06T05:00:00Z"}',
    "credit": b'{"op":"credit","sid":"s1","n":5}',
    "unsubscribe": b'{"op":"unsubscribe","id":"s1"}',
    "ping": b'{"op":"ping"}',
    "auth": b'{"op":"auth","id":1,"token":"abc.def.ghi"}',
    "named": b'{"op":"register","id":2,"name":"bob"}',
    "watch": b'{"op":"presence_watch","id":"w","pattern":"team.>"}',
    "legacy": b'{"task_id":"t1","payload":"hello","retry":"yes","id":4}',
    "escapes": b'{"subject":"a\\u002eb","data":"line\\nbreak \\u00e9","retry":true,"priority":"low"}',
    "bad": b'{"op":"dance","id":7,"subject":"a"}',
    "array": b'["request",1,"demo.echo"]',
}


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs(claims, secret=SECRET, alg="HS256", header=None):
    head = b64(json.dumps(header or {"alg": alg, "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    mac = hmac.new(secret, f"{head}.{body}".encode(), digest).digest()
    return f"{head}.{body}.{b64(mac)}"


def es256(claims):
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    with open(os.path.join(ROOT, "tests", "fixtures", "keys", "p256.pem"), "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    head = b64(json.dumps({"alg": "ES256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    der = key.sign(f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return f"{head}.{body}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def ws_frame(first, payload, mask=b"\x37\xfa\x21\x3d"):
    """A client's WebSocket frame (RFC 6455), masked as a client must."""
    n = len(payload)
    if n < 126:
        head = struct.pack(">BB", first, 0x80 | n)
    elif n < 65536:
        head = struct.pack(">BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack(">BBQ", first, 0x80 | 127, n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def main():
    for name, data in FRAMES.items():
        write("binary_frame", name, control(len(data) // 2, 3) + data)
        write("ws_envelope", "binary-" + name, control(1, 3) + data)
    everything = b"".join(FRAMES.values())
    write("binary_frame", "stream", control(len(everything) // 3, 3) + everything)
    big = frame(PUBLISH, 11, b"a", payload=b"z" * 200)
    write("binary_frame", "over-limit-then-ok", control(30, 0) + big + FRAMES["ping"])
    write("binary_frame", "bad-version", control(1, 3) + b"\xc1\x09" + FRAMES["ping"][2:])

    # ws_frames: whole messages, fragments with a ping between, a close, and a frame over
    # the limit followed by one under it.
    text = ws_frame(0x81, LINES["ping"])
    binary = ws_frame(0x82, FRAMES["ping"])
    pieces = (ws_frame(0x01, b'{"op":') + ws_frame(0x89, b"hi") + ws_frame(0x00, b'"pi')
              + ws_frame(0x80, b'ng"}'))
    close = ws_frame(0x88, struct.pack(">H", 1000) + b"bye")
    write("ws_frames", "messages", control(len(text) + 3, 3) + text + binary + close)
    write("ws_frames", "fragments", control(7, 3) + pieces)
    write("ws_frames", "long-then-short",
          control(2, 0) + ws_frame(0x82, b"x" * 300) + text)

    for name, line in LINES.items():
        write("json_lines", name, control(len(line) // 2, 3) + line + b"\n")
        write("ws_envelope", "text-" + name, control(0, 3) + line)
    stream = b"\n".join(LINES.values()) + b"\r\n\n  \n" + LINES["ping"]
    write("json_lines", "stream", control(len(stream) // 3, 3) + stream)
    write("json_lines", "over-limit-then-ok",
          control(40, 0) + b'{"subject":"' + b"a" * 100 + b'"}\n' + LINES["ping"] + b"\n")

    with open(os.path.join(ROOT, "dist", "policy.example.toml"), "rb") as f:
        write("policy_file", "example", f.read())
    write("policy_file", "small", b'[[grant]]\nmatch = { any = true }\n'
          b'publish = { allow = ["a.>"], deny = ["a.b"] }\nsubscribe = { allow = ["_INBOX.x.>"] }\n')
    write("policy_file", "cert", b'[[grant]]\nmatch = { cert = "CN=alice,O=Example" }\n'
          b'request = { allow = ["$JS.API.INFO", "svc.>"] }\n')
    write("policy_file", "bad-pattern", b'[[grant]]\nmatch = { user = "u" }\npublish = { allow = ["a.>.b"] }\n')

    claims = {"sub": "alice", "exp": FAR}
    tokens = {
        "hs256": hs(claims),
        "hs384": hs(dict(claims, nbf=1, aud="x"), alg="HS384"),
        "hs512": hs(dict(claims, exp=FAR + 0.5), alg="HS512"),
        "es256": es256(claims),
        "none": b64(b'{"alg":"none"}') + "." + b64(json.dumps(claims).encode()) + ".",
        "expired": hs({"sub": "alice", "exp": 1000}),
        "wrong-secret": hs(claims, secret=OTHER_SECRET),
        "no-sub": hs({"exp": FAR}),
    }
    for name, token in tokens.items():
        write("jwt", name, b"\x00" + token.encode())
    header = b'{"alg":"HS256","typ":"JWT"}'
    write("jwt", "signed-right", b"\x01" + header + b"\n" + json.dumps(claims).encode())
    write("jwt", "signed-wrong", b"\x02" + header + b"\n" + json.dumps(claims).encode())
    write("jwt", "signed-hs512", b"\x01" + b'{"alg":"HS512"}\n' + json.dumps(claims).encode())


if __name__ == "__main__":
    main()
