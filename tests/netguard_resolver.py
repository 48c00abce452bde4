"""A resolver for the guard's tests (getaddrinfo's signature): test names map to addresses, no DNS."""

import socket

NAMES = {
    "evil.example": "127.0.0.1",
    "good.example": "127.0.0.1",
    "public.example": "93.184.216.34",
    "rebind.example": "10.0.0.7",
    "localhost": "127.0.0.1",
}


def resolve(host, port, family=0, kind=0, proto=0, flags=0):
    address = NAMES.get(str(host).lower(), host)
    return socket.getaddrinfo(address, port, family, kind, proto, flags | socket.AI_NUMERICHOST)
