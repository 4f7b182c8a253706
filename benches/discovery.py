#!/usr/bin/env python3
"""Discovery at scale: 1,000 etcd services x 10 endpoints, 1,000 etcd forwards.

usage: benches/discovery.py BIN [CHANGES] > result.json
Starts etcd (Debian etcd-server) on loopback with a temp data dir, writes the
keys in `ambassador register`'s layout through etcd's JSON gateway, starts BIN
with a config file of 1,000 etcd forwards, reads VmRSS/VmHWM and the thread
count once every set is loaded, then moves CHANGES services (delete the
service's keys, put one endpoint that is a real listener) and times, from the
delete, the first connection through the ambassador answered by the new
backend. Every loop is bounded in count and time.
"""
import base64, http.client, json, os, shutil, socket, subprocess, sys, tempfile, threading, time

BIN = sys.argv[1]
CHANGES = int(sys.argv[2]) if len(sys.argv) > 2 else 200
SERVICES, PER = 1000, 10
EC, EP = 23791, 23801
FWD0 = 30000
NEW = 31001
b64 = lambda s: base64.b64encode(s.encode()).decode()

def backend(port, word):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); s.listen(512)
    def loop():
        while True:
            c, _ = s.accept(); c.sendall(word); c.close()
    threading.Thread(target=loop, daemon=True).start()

def main():
    d = tempfile.mkdtemp(prefix="amb-disc-bench-")
    etcd = subprocess.Popen(["etcd", "--data-dir", d + "/etcd", "--listen-client-urls", f"http://127.0.0.1:{EC}",
        "--advertise-client-urls", f"http://127.0.0.1:{EC}", "--listen-peer-urls", f"http://127.0.0.1:{EP}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{EP}", "--initial-cluster", f"default=http://127.0.0.1:{EP}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    amb = None
    try:
        h = None
        for _ in range(100):
            try:
                h = http.client.HTTPConnection("127.0.0.1", EC, timeout=5); h.request("POST", "/v3/kv/range", json.dumps({"key": b64("x")})); h.getresponse().read(); break
            except OSError:
                time.sleep(0.1)
        def call(path, body):
            h.request("POST", path, json.dumps(body)); r = h.getresponse(); r.read(); assert r.status == 200, r.status
        t0 = time.time()
        for s in range(SERVICES):
            for e in range(PER):
                a = f"127.0.0.2:{40000 + e}"
                call("/v3/kv/put", {"key": b64(f"/ambassador/services/s{s}/{a}"), "value": b64(a)})
        load_s = time.time() - t0
        backend(NEW, b"N")
        conf = d + "/a.toml"
        with open(conf, "w") as f:
            for s in range(SERVICES):
                f.write(f'[[forward]]\nlisten = "127.0.0.1:{FWD0 + s}"\nbackends = ["etcd://127.0.0.1:{EC}/s{s}"]\n\n')
        log = open(d + "/amb.log", "w")
        t0 = time.time()
        amb = subprocess.Popen([BIN, "--mode", "epoll", "--config", conf], stdout=log, stderr=subprocess.STDOUT)
        while time.time() - t0 < 120:
            try:
                socket.create_connection(("127.0.0.1", FWD0 + SERVICES - 1), timeout=1).close(); break
            except OSError:
                time.sleep(0.1)
        ready_s = time.time() - t0
        time.sleep(2)
        st = {l.split(":")[0]: l.split(":")[1].strip() for l in open(f"/proc/{amb.pid}/status")}
        fds = len(os.listdir(f"/proc/{amb.pid}/fd"))
        conns = subprocess.run(["ss", "-tnH", "state", "established", f"( dport = :{EC} )"], capture_output=True, text=True).stdout.count("\n")
        lat = []
        deadline = time.time() + 240
        for i in range(CHANGES):
            if time.time() > deadline: break
            s = (i * 7) % SERVICES
            t = time.perf_counter()
            pre = b64(f"/ambassador/services/s{s}/")
            end = b64(f"/ambassador/services/s{s}0")  # '/' + 1 = '0'
            call("/v3/kv/deleterange", {"key": pre, "range_end": end})
            a = f"127.0.0.1:{NEW}"
            call("/v3/kv/put", {"key": b64(f"/ambassador/services/s{s}/{a}"), "value": b64(a)})
            got = None
            for _ in range(5000):
                try:
                    c = socket.create_connection(("127.0.0.1", FWD0 + s), timeout=1); c.settimeout(0.5)
                    got = c.recv(1); c.close()
                except OSError:
                    got = None
                if got == b"N": break
                time.sleep(0.001)
            if got == b"N":
                lat.append((time.perf_counter() - t) * 1000)
        lat.sort()
        q = lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))], 2) if lat else None
        print(json.dumps({"bin": BIN, "services": SERVICES, "endpoints": SERVICES * PER, "etcd_load_s": round(load_s, 1),
            "ready_s": round(ready_s, 2), "VmRSS": st["VmRSS"], "VmHWM": st["VmHWM"], "threads": int(st["Threads"]),
            "fds": fds, "etcd_connections": conns, "changes": len(lat), "change_to_first_conn_ms": {"p50": q(0.5), "p99": q(0.99), "max": q(1.0)}}))
    finally:
        if amb: amb.terminate(); amb.wait(10)
        etcd.terminate(); etcd.wait(10)
        shutil.rmtree(d, ignore_errors=True)

main()
