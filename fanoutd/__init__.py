"""fanoutd: a packet-capture daemon on PACKET_FANOUT and TPACKET_V3 rings."""

__version__ = "0.1.0"
