#!/usr/bin/env python3
"""Writes the seed corpora (fuzz/corpus/<target>/) from inputs the unit and
integration tests use: real requests, frames, hellos, sends, hook and join
bodies. Run from fuzz/: python3 seeds/make_seeds.py"""
import base64, hashlib, json, os, struct

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives import serialization

KEY = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90"
SIG = "ab" * 64


def write(target, items):
    d = os.path.join("corpus", target)
    os.makedirs(d, exist_ok=True)
    for item in items:
        data = item.encode() if isinstance(item, str) else item
        name = hashlib.sha1(data).hexdigest()
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)


def frame(opcode, payload, fin=True, mask=b"\x37\xfa\x21\x3d"):
    out = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        out += bytes([0x80 | n])
    elif n <= 0xFFFF:
        out += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        out += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return out + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


requests = [
    "GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
    "POST /hook/set-status HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
    "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /ws?token=abc HTTP/1.1\r\n\r\n",
    "GET http://h:7900/health?x HTTP/1.1\r\n\r\n",
    "GET / HTTP/1.0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n",
    "POST / HTTP/1.1\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\nabc",
    "POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n",
    "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
    "POST /join HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 1500\r\n\r\n",
    "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    "OPTIONS /hook/set-status HTTP/1.1\r\nOrigin: http://a\r\n\r\n",
    "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "GET / HTTP/1.1\nHost: x\n\n",
]
write("http_head", requests)

hello = json.dumps({"type": "hello", "meshId": "m", "memberId": "u", "pubkey": KEY,
                    "sessionId": "s", "pid": 12, "cwd": "/w", "timestamp": 1764200000000,
                    "signature": SIG, "displayName": "alice",
                    "groups": [{"name": "eng/backend", "role": "lead"}],
                    "capabilities": ["peer_events", "client_ack"], "protocolVersion": 2},
                   separators=(",", ":"))
messages = [
    hello,
    f'{{"type":"hello","meshId":"m","memberId":"u","pubkey":"{KEY}","sessionId":"s","pid":12,"cwd":"/w","timestamp":1764200000000,"signature":"{SIG}"}}',
    f'{{"type":"send","targetSpec":"{KEY}","priority":"low","nonce":"n","ciphertext":"c","id":"1"}}',
    '{"type":"send","targetSpec":"*","nonce":"a\\"b","ciphertext":"\\u00e9","extra":{"x":[1]}}',
    '{"type":"send","targetSpec":"@eng","nonce":"n","ciphertext":"c","id":"s","_reqId":"r1","client_message_id":"c-1"}',
    '{"type":"send","targetSpec":"#Eng/API","priority":null,"nonce":"n","ciphertext":"c","id":null}',
    '{"type":"send","targetSpec":"tag:x","nonce":"n","ciphertext":"c","id":"u"}',
    '{"type":"set_status","status":"idle","_reqId":"q"}',
    '{"type":"list_peers","_reqId":"r"}',
    '{"type":"set_summary","summary":"working on it"}',
    '{"type":"join_group","name":"eng","role":"lead"}',
    '{"type":"leave_group","name":"eng"}',
    '{"type":"client_ack","messageIds":["m1","m2"]}',
    '{"type":"client_ack","brokerMessageId":"m1"}',
    '{"type":"kick","target":"bob"}',
    '{"type":"ban","target":"bob","reason":"spam"}',
    '{"type":"audit_query","limit":10,"beforeId":"x","eventType":"member_joined"}',
    '{"type":"audit_verify"}',
    '{"type":"nope"}',
    '[1,2]',
    '{"id":"x","type":"send","targetSpec":"*","nonce":"n","ciphertext":"' + "c" * 300,
]
write("protocol_json", messages)
write("hello_canonical", [m for m in messages if '"hello"' in m])

hooks = [
    '{"cwd":"/w/p","pid":4242,"status":"working","session_id":"abc","x":[1]}',
    '{"cwd":"/w","status":"dnd"}',
    '{"cwd":"/w","status":"idle","pid":null,"session_id":null}',
    '{"cwd":"/w",}',
    b'{"cwd":"\xff","status":"idle"}',
    '{"cwd":"/w","status":"sleeping"}',
    '{"cwd":"/w","status":"idle","pid":12.0}',
]
write("hook_body", hooks)

owner = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
owner_pub = owner.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw).hex()
payload = {"v": 1, "mesh_id": "mesh-1", "mesh_slug": "team", "broker_url": "wss://b/ws",
           "expires_at": 1735689600, "mesh_root_key": "root", "role": "member",
           "owner_pubkey": owner_pub}
canon = "|".join(str(payload[k]) for k in ["v", "mesh_id", "mesh_slug", "broker_url",
                                            "expires_at", "mesh_root_key", "role", "owner_pubkey"])
payload["signature"] = owner.sign(canon.encode()).hex()
token = base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode().rstrip("=")
join = {"invite_token": token, "invite_payload": payload, "peer_pubkey": KEY, "display_name": "alice"}
bad = dict(payload, signature="00" * 64)
joins = [
    json.dumps(join, separators=(",", ":")),
    json.dumps(dict(join, invite_payload=bad)),
    json.dumps(dict(join, display_name="  ")),
    json.dumps(dict(join, invite_payload=dict(payload, role="owner"))),
    '{"invite_token":"x"}',
]
write("join_body", joins)

text = b'{"type":"send","targetSpec":"*","nonce":"n","ciphertext":"c"}'
streams = [
    frame(1, text),
    frame(1, text[:10], fin=False) + frame(9, b"ping") + frame(0, text[10:]),
    frame(2, bytes(300)) + frame(8, struct.pack(">H", 1000) + b"bye"),
    frame(1, "é".encode()[:1], fin=False) + frame(0, "é".encode()[1:]),
    frame(10, b"") + frame(8, b""),
    frame(1, b"\xff"),
    bytes([0x81, 0x05]) + b"hello",
]
# ws_frames: a limit byte, a cut count and cut offsets, then the stream.
write("ws_frames", [bytes([0, 2]) + struct.pack("<HH", 3, 20) + s for s in streams]
      + [bytes([4, 0]) + frame(2, bytes(20))])

# session_hello (PROTOCOL.md §9): the two signed texts it carries.
SESSION = "0f" * 32


def session_hello(**fields):
    message = {"type": "session_hello", "meshId": "mesh-1", "parentMemberId": "mem-7",
               "parentMemberPubkey": KEY, "sessionPubkey": SESSION, "sessionId": "s-1",
               "pid": 1234, "cwd": "/w", "timestamp": 1764200000000, "signature": SIG,
               "parentAttestation": {"sessionPubkey": SESSION, "parentMemberPubkey": KEY,
                                     "expiresAt": 1764243200000, "signature": SIG}}
    message.update(fields)
    return json.dumps(message)


session_hellos = [
    session_hello(),
    session_hello(displayName="d", groups=[{"name": "g", "role": "r"}],
                  capabilities=["peer_events"], _reqId="r1"),
    session_hello(meshId="m|x"),
    session_hello(parentAttestation={"sessionPubkey": KEY, "parentMemberPubkey": SESSION,
                                     "expiresAt": -1, "signature": SIG}),
]
write("hello_canonical", session_hellos)
write("protocol_json", session_hellos)
