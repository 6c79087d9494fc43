"""Shared-memory ring transport: one SPSC ring per publisher on the same host.

`ring` is the layout and the producer/consumer protocol over any buffer (also used by RDMA);
`server` is the appliance side (creates rings on request, polls them); `publisher` is the
client side (`ShmPublisher`).
"""
