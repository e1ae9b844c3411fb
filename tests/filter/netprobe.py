#!/usr/bin/env python3
"""Real traffic for the filter's namespace tests (run inside a namespace).

serve-tcp PORT          echo server on 0.0.0.0 and ::, one line per connection
serve-udp PORT          echo server on 0.0.0.0 and ::
tcp HOST PORT MSG [SRC] connect (from SRC if given), send MSG, print the echo or TIMEOUT
udp HOST PORT MSG [SRC] the same over UDP
bulk HOST PORT N        send N bytes to an echo server while reading them
                        back; print OK N when every byte came back intact
hold HOST PORT          connect, echo "one", print ONE, wait for a line on stdin,
                        echo "two", print TWO or CUT
reversed HOST PORT N     send an N-byte UDP datagram to an echo server as
                        fragments, last first (raw socket); print the echo
Every wait is bounded (2 s per reply, 60 s for a server's life).
"""
import socket, sys, threading, time

def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET

def serve_tcp(port):
    def one(fam, addr):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port)); s.listen(64)
        while True:
            c, _ = s.accept()
            def echo(c=c):
                c.settimeout(30)
                try:
                    while True:
                        d = c.recv(4096)
                        if not d: break
                        c.sendall(d)
                except OSError:
                    pass
                c.close()
            threading.Thread(target=echo, daemon=True).start()
    for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        threading.Thread(target=one, args=(fam, addr), daemon=True).start()
    print("READY", flush=True)
    time.sleep(60)

def serve_udp(port):
    def one(fam, addr):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port))
        while True:
            d, a = s.recvfrom(65536)
            s.sendto(d, a)
    for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        threading.Thread(target=one, args=(fam, addr), daemon=True).start()
    print("READY", flush=True)
    time.sleep(60)

def client(kind, host, port, msg, src=None):
    if msg.startswith("big:"):
        # A datagram larger than the MTU: the sender's kernel fragments it.
        msg = "x" * int(msg[4:])
    s = socket.socket(family(host), socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(2)
    if src:
        s.bind((src, 0))
    try:
        if kind == "tcp":
            s.connect((host, port)); s.sendall(msg.encode()); d = s.recv(4096)
        else:
            # Connected, so an ICMP port-unreachable surfaces as REFUSED.
            s.connect((host, port)); s.send(msg.encode()); d = s.recv(65536)
        text = d.decode() if d else "CLOSED"
        print(f"{len(text)} bytes" if len(text) > 100 else text)
    except ConnectionRefusedError:
        print("REFUSED")
    except (socket.timeout, TimeoutError, OSError):
        print("TIMEOUT")

def bulk(host, port, n):
    import hashlib
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.settimeout(5)
    block = bytes(range(256)) * 256
    sent = hashlib.sha256()
    def send():
        left = n
        while left > 0:
            b = block[:min(left, len(block))]
            s.sendall(b); sent.update(b); left -= len(b)
    try:
        s.connect((host, port))
        t = threading.Thread(target=send, daemon=True); t.start()
        got, h = 0, hashlib.sha256()
        while got < n:
            d = s.recv(1 << 20)
            if not d: break
            h.update(d); got += len(d)
        t.join(30)
        print(f"OK {got}" if got == n and h.digest() == sent.digest() else f"BAD {got}")
    except (socket.timeout, TimeoutError, OSError):
        print("TIMEOUT")

def hold(host, port):
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.settimeout(2)
    s.connect((host, port)); s.sendall(b"one")
    print("ONE" if s.recv(16) == b"one" else "BAD", flush=True)
    sys.stdin.readline()
    try:
        s.sendall(b"two")
        print("TWO" if s.recv(16) == b"two" else "CUT", flush=True)
    except (socket.timeout, TimeoutError, OSError):
        print("CUT", flush=True)

def stream(host, port, seconds, per_second):
    # A UDP conversation: one datagram and its echo every 1/per_second s.
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    s.settimeout(1)
    s.connect((host, port))
    sent = got = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        s.send(b"tick"); sent += 1
        try:
            if s.recv(64) == b"tick": got += 1
        except (socket.timeout, TimeoutError, OSError):
            pass
        time.sleep(1 / per_second)
    print(f"SENT {sent} GOT {got}", flush=True)

def checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(int.from_bytes(b[i:i + 2], "big") for i in range(0, len(b), 2))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff

def tagged_udp(vid, src, dst, sport, dport):
    import ipaddress
    payload = b"tagged"
    udp = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + (8 + len(payload)).to_bytes(2, "big") + b"\0\0" + payload
    ip = bytearray(b"\x45\0" + (20 + len(udp)).to_bytes(2, "big") + b"\0\1\0\0\x40\x11\0\0"
                   + ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed)
    ip[10:12] = checksum(bytes(ip)).to_bytes(2, "big")
    eth = b"\xff" * 6 + b"\x02\0\0\0\0\x0a" + b"\x81\x00" + vid.to_bytes(2, "big") + b"\x08\x00"
    return eth + bytes(ip) + udp

def reversed_fragments(host, port, n):
    """A datagram whose fragments leave last first, as some senders and
    reordering paths deliver them. The reply comes back as the echo
    server's kernel fragments it."""
    import ipaddress, random
    v6 = ":" in host
    src = "2001:db8:1::10" if v6 else "192.0.2.10"
    r = socket.socket(family(host), socket.SOCK_DGRAM)
    r.settimeout(2)
    r.bind((src, 0))
    sport = r.getsockname()[1]
    data = bytes(65 + i % 26 for i in range(n))
    length = 8 + n
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(host).packed
    pseudo = s + d + (length.to_bytes(4, "big") + b"\0\0\0\x11" if v6 else b"\0\x11" + length.to_bytes(2, "big"))
    udp = sport.to_bytes(2, "big") + port.to_bytes(2, "big") + length.to_bytes(2, "big") + b"\0\0" + data
    c = checksum(pseudo + udp) or 0xffff
    udp = udp[:6] + c.to_bytes(2, "big") + udp[8:]
    ident = random.randrange(1, 1 << 16)
    step = 1448 if v6 else 1480
    packets = []
    for off in range(0, len(udp), step):
        part, more = udp[off:off + step], off + step < len(udp)
        flags = (off // 8) << 3 | more
        if v6:
            frag = b"\x11\0" + flags.to_bytes(2, "big") + ident.to_bytes(4, "big")
            hdr = b"\x60\0\0\0" + (8 + len(part)).to_bytes(2, "big") + b"\x2c\x40" + s + d
            packets.append(hdr + frag + part)
        else:
            flags = (off // 8) | (more << 13)
            hdr = bytearray(b"\x45\0" + (20 + len(part)).to_bytes(2, "big") + ident.to_bytes(2, "big")
                            + flags.to_bytes(2, "big") + b"\x40\x11\0\0" + s + d)
            hdr[10:12] = checksum(bytes(hdr)).to_bytes(2, "big")
            packets.append(bytes(hdr) + part)
    raw = socket.socket(family(host), socket.SOCK_RAW, socket.IPPROTO_RAW)
    for p in reversed(packets):
        raw.sendto(p, (host, 0))
    try:
        got = r.recv(65536)
        print(f"{len(got)} bytes" if got == data else "CORRUPT")
    except (socket.timeout, TimeoutError, OSError):
        print("TIMEOUT")

def inject(iface, dport):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    s.send(tagged_udp(10, "192.0.2.10", "192.0.2.200", 40000, dport))
    print("SENT", flush=True)

def sniff(iface, seconds):
    """Tagged UDP frames seen, by destination port. The kernel moves a
    received 802.1Q tag out of the frame into PACKET_AUXDATA (as libpcap
    knows), so the tag is read from there or from the frame."""
    import struct
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    s.bind((iface, 3))
    s.setsockopt(263, 8, 1)  # SOL_PACKET, PACKET_AUXDATA
    s.settimeout(0.2)
    print("READY", flush=True)
    seen = {}
    end = time.time() + seconds
    while time.time() < end:
        try:
            f, anc, _, _ = s.recvmsg(65536, 256)
        except socket.timeout:
            continue
        vid = None
        for level, kind, data in anc:
            if level == 263 and kind == 8 and len(data) >= 20:
                status, _, _, _, _, tci, _ = struct.unpack("IIIHHHH", data[:20])
                if status & 0x10:
                    vid = tci & 0xfff
        if f[12:14] == b"\x81\x00":
            vid, f = int.from_bytes(f[14:16], "big") & 0xfff, f[:12] + f[16:]
        if vid == 10 and len(f) >= 38 and f[12:14] == b"\x08\x00" and f[23] == 17:
            port = int.from_bytes(f[36:38], "big")
            seen[port] = seen.get(port, 0) + 1
    print(" ".join(f"{p}:{n}" for p, n in sorted(seen.items())) or "none", flush=True)

if __name__ == "__main__":
    a = sys.argv[1:]
    if a[0] == "serve-tcp": serve_tcp(int(a[1]))
    elif a[0] == "serve-udp": serve_udp(int(a[1]))
    elif a[0] in ("tcp", "udp"): client(a[0], a[1], int(a[2]), a[3], a[4] if len(a) > 4 else None)
    elif a[0] == "hold": hold(a[1], int(a[2]))
    elif a[0] == "bulk": bulk(a[1], int(a[2]), int(a[3]))
    elif a[0] == "stream": stream(a[1], int(a[2]), float(a[3]), float(a[4]))
    elif a[0] == "inject": inject(a[1], int(a[2]))
    elif a[0] == "reversed": reversed_fragments(a[1], int(a[2]), int(a[3]))
    elif a[0] == "sniff": sniff(a[1], float(a[2]))
