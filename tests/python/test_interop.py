"""shardwire's Python package and the real Mooncake wheel, both directions,
every byte checked. (shardwire initiating at a Mooncake target is also in
test_wheel_tests.py, parametrized.)"""
from conftest import Peer, pattern
from shardwire import TransferNotify, TransferOpcode


def test_mooncake_initiator_against_a_shardwire_target(engine):
    remote = engine.allocate_managed_buffer(32 << 20)
    name = f"127.0.0.1:{engine.get_rpc_port()}"
    peer = Peer("mooncake", "initiator", name, remote, 32 << 20)
    try:
        for i, (offset, length) in enumerate([(0, 1), (9, 1000), (4096, 65536), (1 << 20, (4 << 20) + 5)]):
            assert peer.cmd(f"write {offset} {length} {i}") == "ok"
            assert engine.read_bytes_from_buffer(remote + offset, length) == pattern(length, i)
            engine.write_bytes_to_buffer(remote + offset, pattern(length, 50 + i), length)
            assert peer.cmd(f"read {offset} {length} {50 + i}") == "ok"
        assert peer.cmd("batch 100 1024 7") == "ok"
        assert peer.cmd("async 16 8192 9") == "ok"
        assert peer.cmd("notify hello") == "ok 0"
        notes = engine.get_notifies()
        assert [(n.name, n.msg) for n in notes] == [("mooncake-peer", "hello")]
        assert peer.cmd(f"probe {name}") == "ok 0"
    finally:
        peer.close()


def test_shardwire_initiator_against_a_mooncake_target(engine, mooncake_target):
    local = engine.allocate_managed_buffer(8 << 20)
    for i, length in enumerate([1, 777, 65536, 3 << 20]):
        engine.write_bytes_to_buffer(local, pattern(length, i), length)
        assert engine.transfer_sync_write(mooncake_target.name, local, mooncake_target.buffer, length) == 0
        assert mooncake_target.cmd(f"check 0 {length} {i}") == "ok"
        assert mooncake_target.cmd(f"fill 0 {length} {20 + i}") == "ok"
        assert engine.transfer_sync(mooncake_target.name, local, mooncake_target.buffer, length,
                                    TransferOpcode.Read) == 0
        assert engine.read_bytes_from_buffer(local, length) == pattern(length, 20 + i)
    note = TransferNotify("shardwire", "done")
    assert engine.transfer_sync(mooncake_target.name, local, mooncake_target.buffer, 8, TransferOpcode.Write,
                                note) == 0
    assert mooncake_target.cmd("notifies") == "notifies shardwire=done"
