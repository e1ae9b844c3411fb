#!/usr/bin/env python3
"""Real traffic for the filter's namespace tests (run inside a namespace).

serve-tcp PORT          echo server on 0.0.0.0 and ::, one line per connection
serve-udp PORT          echo server on 0.0.0.0 and ::
tcp HOST PORT MSG [SRC] connect (from SRC if given), send MSG, print the echo or TIMEOUT
udp HOST PORT MSG [SRC] the same over UDP
hold HOST PORT          connect, echo "one", print ONE, wait for a line on stdin,
                        echo "two", print TWO or CUT
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
            d, a = s.recvfrom(4096)
            s.sendto(d, a)
    for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        threading.Thread(target=one, args=(fam, addr), daemon=True).start()
    print("READY", flush=True)
    time.sleep(60)

def client(kind, host, port, msg, src=None):
    s = socket.socket(family(host), socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(2)
    if src:
        s.bind((src, 0))
    try:
        if kind == "tcp":
            s.connect((host, port)); s.sendall(msg.encode()); d = s.recv(4096)
        else:
            s.sendto(msg.encode(), (host, port)); d, _ = s.recvfrom(4096)
        print(d.decode() if d else "CLOSED")
    except (socket.timeout, TimeoutError, ConnectionRefusedError, OSError):
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

if __name__ == "__main__":
    a = sys.argv[1:]
    if a[0] == "serve-tcp": serve_tcp(int(a[1]))
    elif a[0] == "serve-udp": serve_udp(int(a[1]))
    elif a[0] in ("tcp", "udp"): client(a[0], a[1], int(a[2]), a[3], a[4] if len(a) > 4 else None)
    elif a[0] == "hold": hold(a[1], int(a[2]))
