"""Kernel ABI only: constants and struct layouts from <linux/if_packet.h> and friends.

Nothing here has behaviour; ring.py, fanout.py and decode.py build on it. Layouts are
precompiled `struct.Struct`s (little-endian, as the kernel writes them on x86_64/aarch64)
because they sit on the hot path; the ctypes request structure is only used at set-up.
"""

import ctypes
import struct

SOL_PACKET = 263
ETH_P_ALL = 0x0003

# setsockopt(SOL_PACKET, ...) option names
PACKET_ADD_MEMBERSHIP = 1
PACKET_DROP_MEMBERSHIP = 2
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_HDRLEN = 11
PACKET_TIMESTAMP = 17
PACKET_FANOUT = 18
PACKET_QDISC_BYPASS = 20

TPACKET_V3 = 2  # enum tpacket_versions { TPACKET_V1, TPACKET_V2, TPACKET_V3 }
TPACKET_ALIGNMENT = 16

# Fanout modes (low 16 bits of the type word) and flags.
PACKET_FANOUT_HASH = 0
PACKET_FANOUT_LB = 1
PACKET_FANOUT_CPU = 2
PACKET_FANOUT_ROLLOVER = 3
PACKET_FANOUT_RND = 4
PACKET_FANOUT_QM = 5
PACKET_FANOUT_FLAG_ROLLOVER = 0x1000
PACKET_FANOUT_FLAG_UNIQUEID = 0x2000
PACKET_FANOUT_FLAG_IGNORE_OUTGOING = 0x4000
PACKET_FANOUT_FLAG_DEFRAG = 0x8000

# Block and frame status bits.
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1 << 0
TP_STATUS_COPY = 1 << 1
TP_STATUS_LOSING = 1 << 2
TP_STATUS_CSUMNOTREADY = 1 << 3
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_BLK_TMO = 1 << 5
TP_STATUS_VLAN_TPID_VALID = 1 << 6
TP_STATUS_CSUM_VALID = 1 << 7
TP_STATUS_TS_SOFTWARE = 1 << 29
TP_STATUS_TS_RAW_HARDWARE = 1 << 31

TP_FT_REQ_FILL_RXHASH = 0x1

# sll_pkttype values
PACKET_HOST = 0
PACKET_BROADCAST = 1
PACKET_MULTICAST = 2
PACKET_OTHERHOST = 3
PACKET_OUTGOING = 4

# struct packet_mreq.mr_type
PACKET_MR_PROMISC = 1


class TpacketReq3(ctypes.Structure):
    """struct tpacket_req3: the PACKET_RX_RING request for TPACKET_V3."""

    _fields_ = [
        ("tp_block_size", ctypes.c_uint),
        ("tp_block_nr", ctypes.c_uint),
        ("tp_frame_size", ctypes.c_uint),
        ("tp_frame_nr", ctypes.c_uint),
        ("tp_retire_blk_tov", ctypes.c_uint),
        ("tp_sizeof_priv", ctypes.c_uint),
        ("tp_feature_req_word", ctypes.c_uint),
    ]


# struct tpacket_stats_v3 { tp_packets, tp_drops, tp_freeze_q_cnt } (all __u32)
TPACKET_STATS_V3 = struct.Struct("<III")

# struct tpacket_block_desc: version, offset_to_priv, then struct tpacket_hdr_v1:
#   block_status, num_pkts, offset_to_first_pkt, blk_len, (__aligned_u64) seq_num,
#   ts_first_pkt {sec, nsec}, ts_last_pkt {sec, nsec}
BLOCK_DESC = struct.Struct("<IIIIIIQIIII")
BLOCK_STATUS_OFFSET = 8  # offset of h1.block_status inside the block descriptor
BLOCK_STATUS = struct.Struct("<I")
# The fields a reader needs, from the block_status offset on: status, num_pkts,
# offset_to_first_pkt, blk_len, seq_num.
BLOCK_HEAD = struct.Struct("<IIIIQ")
# ts_first_pkt and ts_last_pkt, from this offset on: sec, nsec, sec, nsec.
BLOCK_TIMES_OFFSET = 32
BLOCK_TIMES = struct.Struct("<IIII")

# struct tpacket3_hdr (48 bytes) followed, at TPACKET_ALIGN(48) = 48, by struct sockaddr_ll.
#   tp_next_offset, tp_sec, tp_nsec, tp_snaplen, tp_len, tp_status, tp_mac, tp_net,
#   hv1 { tp_rxhash, tp_vlan_tci, tp_vlan_tpid, tp_padding }, tp_padding[8],
#   sockaddr_ll { sll_family, sll_protocol (network order, skipped), sll_ifindex,
#                 sll_hatype, sll_pkttype, ... }
TPACKET3_HDR = struct.Struct("<IIIIIIHHIIH2x8x2x2xiHB")
TPACKET3_HDRLEN = 48 + 20  # TPACKET_ALIGN(sizeof(tpacket3_hdr)) + sizeof(sockaddr_ll)

assert BLOCK_DESC.size == 48
assert TPACKET3_HDR.size == 48 + 11


def packet_mreq(ifindex: int, mr_type: int) -> bytes:
    """struct packet_mreq { int mr_ifindex; u16 mr_type; u16 mr_alen; u8 mr_address[8]; }"""
    return struct.pack("@iHH8s", ifindex, mr_type, 0, b"")



# Timestamping (PACKET_TIMESTAMP takes SO_TIMESTAMPING flags) and the driver's abilities.
SOF_TIMESTAMPING_RX_HARDWARE = 1 << 2
SOF_TIMESTAMPING_RX_SOFTWARE = 1 << 3
SOF_TIMESTAMPING_SOFTWARE = 1 << 4
SOF_TIMESTAMPING_RAW_HARDWARE = 1 << 6
SO_TIMESTAMPING = 37

# Interface ioctls (struct ifreq) and flags.
SIOCGIFFLAGS = 0x8913
SIOCGIFMTU = 0x8921
SIOCETHTOOL = 0x8946
IFF_UP = 0x1
IFF_RUNNING = 0x40  # the driver reports carrier
ETHTOOL_GET_TS_INFO = 0x41
ETHTOOL_GFLAGS = 0x25  # the legacy feature flags (struct ethtool_value)
ETH_FLAG_RXHASH = 1 << 28  # the NIC computes a receive hash (NETIF_F_RXHASH)
# struct ethtool_ts_info: cmd, so_timestamping, phc_index, tx_types, tx_reserved[3],
#   rx_filters, rx_reserved[3]
ETHTOOL_TS_INFO = struct.Struct("=IIiI12xI12x")

# rtnetlink (<linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_link.h>): link changes.
IFF_LOWER_UP = 1 << 16  # carrier, as the driver reports it (not in SIOCGIFFLAGS' 16 bits)
SO_RCVBUFFORCE = 33  # SO_RCVBUF beyond net.core.rmem_max (needs CAP_NET_ADMIN)
NETLINK_ROUTE = 0
RTMGRP_LINK = 0x1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
IFLA_IFNAME = 3
NLMSGHDR = struct.Struct("=IHHII")  # nlmsg_len, nlmsg_type, nlmsg_flags, nlmsg_seq, nlmsg_pid
IFINFOMSG = struct.Struct("=BxHiII")  # ifi_family, ifi_type, ifi_index, ifi_flags, ifi_change
RTATTR = struct.Struct("=HH")  # rta_len, rta_type
NLMSGERR_ERROR = struct.Struct("=i")  # struct nlmsgerr starts with the negative errno
