"""The floor: the least Python a keep-alive proxy can do on uvloop + httptools.

No tasks, no futures, no limits, no error handling: GET-only, one upstream, for measuring how far
piuptime's per-request cost is above what the wire layer itself costs. Not a product.

    python bench/bare_proxy.py UPSTREAM_PORT LISTEN_PORT
"""

# ruff: noqa
import asyncio, sys, uvloop, httptools

UP_PORT = int(sys.argv[1])
PORT = int(sys.argv[2])


class Up(asyncio.Protocol):
    def __init__(self):
        self.parser = httptools.HttpResponseParser(self)
        self.client = None
        self.body = []
        self.headers = []

    def connection_made(self, t):
        self.t = t

    def data_received(self, d):
        self.parser.feed_data(d)

    def on_header(self, n, v):
        self.headers.append((n, v))

    def on_body(self, b):
        self.body.append(b)

    def on_message_complete(self):
        c = self.client
        self.client = None
        if c is None:  # the floor handles no errors; ignore strays
            return
        hs = b"".join(
            n + b": " + v + b"\r\n"
            for n, v in self.headers
            if n.lower() not in (b"connection", b"date")
        )
        c.t.write(b"HTTP/1.1 200 OK\r\n" + hs + b"via: 1.1 x\r\n\r\n" + b"".join(self.body))
        self.body = []
        self.headers = []
        pool.append(self)
        c.done()


pool = []


class Down(asyncio.Protocol):
    def __init__(self):
        self.parser = httptools.HttpRequestParser(self)
        self.headers = []
        self.url = b""
        self.q = []
        self.busy = False

    def connection_made(self, t):
        self.t = t

    def data_received(self, d):
        self.parser.feed_data(d)

    def on_url(self, u):
        self.url += u

    def on_header(self, n, v):
        self.headers.append((n.lower(), v))

    def on_message_complete(self):
        self.q.append((self.parser.get_method(), self.url, self.headers))
        self.url = b""
        self.headers = []
        if not self.busy:
            self.next()

    def next(self):
        if not self.q:
            self.busy = False
            return
        self.busy = True
        m, u, hs = self.q.pop(0)
        up = pool.pop() if pool else None
        if up is None:
            asyncio.get_running_loop().create_task(self.connect(m, u, hs))
            return
        self.send(up, m, u, hs)

    async def connect(self, m, u, hs):
        _, up = await asyncio.get_running_loop().create_connection(Up, "127.0.0.1", UP_PORT)
        self.send(up, m, u, hs)

    def send(self, up, m, u, hs):
        up.client = self
        h = b"".join(n + b": " + v + b"\r\n" for n, v in hs if n != b"connection")
        up.t.write(m + b" " + u + b" HTTP/1.1\r\n" + h + b"x-forwarded-for: 127.0.0.1\r\n\r\n")

    def done(self):
        self.next()


async def main():
    srv = await asyncio.get_running_loop().create_server(Down, "127.0.0.1", PORT, backlog=4096)
    await asyncio.Event().wait()


uvloop.run(main())
