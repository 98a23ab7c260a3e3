"""An unmodified QMP client (the qemu.qmp library from PyPI) driving stratad.

Usage: qmp_session.py QMP_SOCKET IMAGE_PATH
Exits non-zero with a message on the first behaviour that differs from QEMU's.
"""
import asyncio
import sys

from qemu.qmp import ExecuteError, QMPClient


async def expect_error(qmp, cmd, args, klass, desc_part):
    try:
        await qmp.execute(cmd, args)
    except ExecuteError as e:
        assert e.error_class == klass, f"{cmd}: class {e.error_class}, wanted {klass}"
        assert desc_part in str(e), f"{cmd}: {str(e)!r} lacks {desc_part!r}"
        return str(e)
    raise AssertionError(f"{cmd} {args} succeeded but should fail")


async def main(sock, image):
    qmp = QMPClient("strata-e2e")
    await qmp.connect(sock)  # reads the greeting and negotiates capabilities
    assert qmp.greeting is not None
    ver = await qmp.execute("query-version")
    assert ver["qemu"]["major"] == 10, ver
    assert ver["package"].startswith("strata"), ver

    with qmp.listener(("BLOCK_NODE_ADDED", "BLOCK_NODE_REMOVED")) as events:
        r = await qmp.execute(
            "blockdev-add",
            {"driver": "raw", "node-name": "disk", "offset": 4096,
             "file": {"driver": "file", "node-name": "disk-file", "filename": image}},
        )
        assert r == {}, r
        seen = set()
        for _ in range(2):
            ev = await asyncio.wait_for(events.get(), 10)
            assert "seconds" in ev["timestamp"] and "microseconds" in ev["timestamp"], ev
            seen.add(ev["data"]["node-name"])
        assert seen == {"disk", "disk-file"}, seen

        nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
        by_name = {n["node-name"]: n for n in nodes}
        assert by_name["disk-file"]["drv"] == "file", by_name
        assert by_name["disk-file"]["file"] == image, by_name["disk-file"]
        assert by_name["disk"]["drv"] == "raw"
        assert by_name["disk"]["image"]["virtual-size"] == 1048576 - 4096, by_name["disk"]

        graph = await qmp.execute("x-debug-query-block-graph")
        edges = [e for e in graph["edges"] if e["name"] == "file"]
        assert len(edges) == 1, graph

        await expect_error(qmp, "blockdev-add", {"driver": "null-co", "node-name": "disk"},
                           "GenericError", "Duplicate nodes with node-name='disk'")
        await expect_error(qmp, "no-such-command", None, "CommandNotFound", "no-such-command")
        await expect_error(qmp, "blockdev-del", {"node-name": "disk-file"},
                           "GenericError", "in use")
        await expect_error(qmp, "blockdev-del", {"node-name": "nope"},
                           "GenericError", "nope")

        # Two writers through the raw node: the second one hits the first one's
        # unshared write, with QEMU's conflict message.
        await qmp.execute("x-debug-block-user-add",
                          {"id": "u1", "node-name": "disk",
                           "perm": ["consistent-read", "write"],
                           "shared-perm": ["consistent-read", "write-unchanged"]})
        msg = await expect_error(qmp, "x-debug-block-user-add",
                                 {"id": "u2", "node-name": "disk",
                                  "perm": ["write"], "shared-perm": []},
                                 "GenericError", "Permission conflict on node 'disk'")
        assert "block device 'u1'" in msg and "block device 'u2'" in msg, msg
        graph = await qmp.execute("query-block-graph")
        file_edge = [e for e in graph["edges"] if e["name"] == "file"][0]
        assert "write" in file_edge["perm"], file_edge
        # raw with an offset is a data child: nobody may resize the file under it; raw
        # takes resize itself only if its users do (QEMU's raw_child_perm).
        assert "resize" not in file_edge["shared-perm"], file_edge
        assert "resize" not in file_edge["perm"], file_edge
        await qmp.execute("x-debug-block-user-del", {"id": "u1"})

        await qmp.execute("blockdev-del", {"node-name": "disk"})
        await qmp.execute("blockdev-del", {"node-name": "disk-file"})
        removed = set()
        for _ in range(2):
            ev = await asyncio.wait_for(events.get(), 10)
            assert ev["event"] == "BLOCK_NODE_REMOVED", ev
            removed.add(ev["data"]["node-name"])
        assert removed == {"disk", "disk-file"}, removed

    assert await qmp.execute("query-named-block-nodes") == []
    await qmp.execute("quit")
    await qmp.disconnect()
    print("qmp session ok")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
