#!/usr/bin/env python3
"""lossyfs: a FUSE file system that forgets what was not synced.

    lossyfs.py BACKING MOUNTPOINT [--tear] [--ignore-fsync] [--seed N]
    lossyfs.py --check

A pass-through to the folder BACKING, which holds the durable state: what a
disk would still hold after the power went out. Every change made through
MOUNTPOINT (writes, truncations, creations, removals, renames) lands first in
a volatile layer kept in memory, the way the kernel's page cache holds it,
and every read sees that layer. A change reaches BACKING only when it is
synced:

- fsync or fdatasync of a file persists its data and its size (both calls
  persist both: the model does not tell data from metadata);
- fsync of a folder persists its entries: the files and folders created,
  removed and renamed in it. A file created and synced, in a folder not
  synced, is gone after a cut; a file whose entry was synced but whose data
  never was is there, empty.

A power cut is asked for through the control file MOUNTPOINT/.lossyfs (not
listed in the folder): write `cut` to it. From that moment every operation
fails with EIO (a process still running sees its disk gone), BACKING holds
what was synced and nothing else, and the process waits to be unmounted
(`fusermount3 -u MOUNTPOINT`). Mounting BACKING again shows what survived.
`arm KIND SUFFIX N [after]` cuts instead at the N-th operation of KIND (write,
truncate, fsync, fsyncdir, create, unlink, rename, mkdir, rmdir, open, read,
..., or any) on a path ending in SUFFIX (`*`: any path), before the operation
runs (it fails with EIO) or, with `after`, once it has returned. Reading the control file
returns `live` or `cut: WHERE`, then the last operation and a line of
counters. `tear on` and `tear off` switch --tear.

With --tear, a cut also writes a random prefix (whole 4 KiB blocks of the
file, possibly none, possibly all) of the last unsynced write of every file
that has a durable name, as a disk may have done before the power failed.
With --ignore-fsync, syncs return success and persist nothing: the broken
file system that the tests must catch.

--check imports the binding, says which libfuse it found and exits.

See README.md beside this file for the model and its limits.
"""

import errno
import os
import random
import shutil
import stat
import sys
import time

BLOCK = 4096
CONTROL = ".lossyfs"
INFINITY = float("inf")


def fail(code):
    raise OSError(code, os.strerror(code))


class Node:
    """A file or folder: its volatile state and where its durable copy is."""

    counter = 1

    def __init__(self, mode):
        Node.counter += 1
        self.ino = Node.counter
        self.mode = mode
        now = time.time_ns()
        self.atime = self.mtime = self.ctime = now
        self.uid = os.getuid()
        self.gid = os.getgid()
        # Its durable location: (durable parent folder, name) once a sync of
        # a folder recorded it there.
        self.dparent = None
        self.dname = None
        # Volatile links (names in folders), for st_nlink and freeing.
        self.links = 0
        self.name = "?"

    def is_dir(self):
        return stat.S_ISDIR(self.mode)


class File(Node):
    def __init__(self, mode, dsize=0):
        super().__init__(mode)
        self.size = dsize  # volatile size
        self.dsize = dsize  # durable size
        self.floor = INFINITY  # durable bytes at or past it are truncated away
        self.dirty = {}  # block index -> bytearray(BLOCK): volatile content
        self.pending = None  # durable bytes while there is no backing file
        self.last_write = None  # (offset, bytes) of the last unsynced write
        self.opens = 0


class Dir(Node):
    def __init__(self, mode):
        super().__init__(mode)
        self.entries = {}  # volatile: name -> Node
        self.dentries = {}  # durable: name -> Node


class LossyFs:
    def __init__(self, backing, tear=False, ignore_fsync=False, seed=None):
        self.backing = os.path.abspath(backing)
        self.tear = tear
        self.ignore_fsync = ignore_fsync
        self.rng = random.Random(seed)
        self.dead = None  # where the power was cut
        self.armed = None  # (kind, text, n, after)
        self.counts = {}
        self.last = "nothing"
        self.handles = {}
        self.next_handle = 1
        self.root = self.load(self.backing, Dir(stat.S_IFDIR | 0o755))
        self.root.links = 1
        self.root.name = "/"

    # ------------------------------------------------------------ durable side

    def load(self, path, folder):
        """Builds the tree from BACKING: everything there is durable."""
        for name in sorted(os.listdir(path)):
            p = os.path.join(path, name)
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                node = self.load(p, Dir(stat.S_IFDIR | stat.S_IMODE(st.st_mode)))
            elif stat.S_ISREG(st.st_mode):
                node = File(stat.S_IFREG | stat.S_IMODE(st.st_mode), st.st_size)
            else:
                continue
            node.mtime = node.ctime = st.st_mtime_ns
            node.dparent, node.dname, node.name = folder, name, name
            node.links = 1
            folder.entries[name] = node
            folder.dentries[name] = node
        return folder

    def bpath(self, node):
        """The path of `node`'s durable copy in BACKING, if it has one."""
        parts = []
        while node is not self.root:
            if node.dparent is None or node.dparent.dentries.get(node.dname) is not node:
                return None
            parts.append(node.dname)
            node = node.dparent
        return os.path.join(self.backing, *reversed(parts))

    def durable_bytes(self, node, offset=0, length=None):
        """`node`'s durable content (a range of it)."""
        path = self.bpath(node)
        end = node.dsize if length is None else min(node.dsize, offset + length)
        if offset >= end:
            return b""
        if path is not None:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(end - offset)
            return data + bytes(end - offset - len(data))
        if node.pending is None:
            return bytes(end - offset)
        return bytes(node.pending[offset:end])

    def stash(self, node):
        """Moves `node`'s durable content to memory (it loses its name)."""
        if isinstance(node, File):
            node.pending = bytearray(self.durable_bytes(node))
        else:
            for child in node.dentries.values():
                if child.dparent is node:
                    self.stash(child)
        node.dparent = node.dname = None

    def materialize(self, node, path):
        """Writes `node` (stashed) at `path` in BACKING, with its durable
        entries if it is a folder."""
        if isinstance(node, File):
            with open(path, "wb") as f:
                if node.pending:
                    f.write(node.pending)
                f.truncate(node.dsize)
            node.pending = None
        else:
            os.mkdir(path)
            for name, child in node.dentries.items():
                if child.dparent is None:
                    child.dparent, child.dname = node, name
                    self.materialize(child, os.path.join(path, name))

    def sync_file(self, node):
        if self.ignore_fsync:
            return
        path = self.bpath(node)
        if path is None:
            node.pending = bytearray(self.read_volatile(node, 0, node.size))
        else:
            with open(path, "r+b") as f:
                if node.floor < node.dsize:
                    f.truncate(int(node.floor))
                f.truncate(node.size)
                for block, data in sorted(node.dirty.items()):
                    start = block * BLOCK
                    if start < node.size:
                        f.seek(start)
                        f.write(data[: node.size - start])
        node.dsize = node.size
        node.floor = INFINITY
        node.dirty = {}
        node.last_write = None

    def sync_dir(self, folder):
        if self.ignore_fsync:
            return
        new = dict(folder.entries)
        old = folder.dentries
        changed = [n for n in set(old) | set(new) if old.get(n) is not new.get(n)]
        here = self.bpath(folder)
        # Everything that moves keeps its durable content in memory first:
        # what goes out (it may still be linked elsewhere, or open), then
        # what comes in (read before anything in BACKING moves).
        for n in changed:
            node = old.get(n)
            if node is not None and node.dparent is folder and node.dname == n:
                self.stash(node)
        for n in changed:
            node = new.get(n)
            if node is not None and node.dparent is not None:
                self.stash(node)
        if here is not None:
            for n in changed:
                p = os.path.join(here, n)
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p)
                elif os.path.lexists(p):
                    os.unlink(p)
        folder.dentries = new
        for n in changed:
            node = new.get(n)
            if node is None:
                continue
            node.dparent, node.dname = folder, n
            if here is not None:
                self.materialize(node, os.path.join(here, n))

    def power_cut(self, where):
        """Drops the volatile layer: BACKING already holds the durable state;
        with --tear, part of each file's last unsynced write reaches it."""
        if self.dead:
            return
        torn = 0
        if self.tear:
            for node in self.all_files():
                if node.last_write is None:
                    continue
                path = self.bpath(node)
                if path is None:
                    continue
                offset, data = node.last_write
                end = offset + len(data)
                bounds = [offset] + [
                    b for b in range((offset // BLOCK + 1) * BLOCK, end, BLOCK)
                ] + [end]
                keep = bounds[self.rng.randrange(len(bounds))] - offset
                if keep:
                    with open(path, "r+b") as f:
                        f.seek(offset)
                        f.write(data[:keep])
                    torn += 1
        self.dead = f"{where}{f' (tore {torn} writes)' if torn else ''}"
        print(f"lossyfs: power cut {self.dead}", file=sys.stderr, flush=True)

    def all_files(self):
        seen, stack, out = set(), [self.root], []
        for h in self.handles.values():
            if isinstance(h, File):
                stack.append(h)
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, Dir):
                stack.extend(node.entries.values())
                stack.extend(node.dentries.values())
            else:
                out.append(node)
        return out

    # ----------------------------------------------------------- volatile side

    def read_volatile(self, node, offset, size):
        end = min(node.size, offset + size)
        if offset >= end:
            return b""
        buf = bytearray(self.durable_bytes(node, offset, end - offset))
        buf.extend(bytes(end - offset - len(buf)))
        if node.floor < end:
            cut = max(int(node.floor), offset)
            buf[cut - offset:] = bytes(end - cut)
        for block in range(offset // BLOCK, (end - 1) // BLOCK + 1):
            data = node.dirty.get(block)
            if data is None:
                continue
            bs, be = block * BLOCK, block * BLOCK + BLOCK
            s, e = max(bs, offset), min(be, end)
            buf[s - offset:e - offset] = data[s - bs:e - bs]
        return bytes(buf)

    def write_volatile(self, node, offset, data):
        end = offset + len(data)
        for block in range(offset // BLOCK, (end - 1) // BLOCK + 1):
            bs = block * BLOCK
            page = node.dirty.get(block)
            if page is None:
                page = bytearray(self.read_volatile(node, bs, BLOCK))
                page.extend(bytes(BLOCK - len(page)))
                node.dirty[block] = page
            s, e = max(bs, offset), min(bs + BLOCK, end)
            page[s - bs:e - bs] = data[s - offset:e - offset]
        node.size = max(node.size, end)
        node.last_write = (offset, bytes(data))
        node.mtime = node.ctime = time.time_ns()

    def truncate_volatile(self, node, length):
        if length < node.size:
            node.floor = min(node.floor, length)
            for block in [b for b in node.dirty if b * BLOCK >= length]:
                del node.dirty[block]
            tail = node.dirty.get(length // BLOCK)
            if tail is not None:
                cut = length % BLOCK
                tail[cut:] = bytes(BLOCK - cut)
        node.size = length
        node.mtime = node.ctime = time.time_ns()

    # ------------------------------------------------------------ bookkeeping

    def gate(self, kind, path, after=False):
        """Counts the operation; cuts the power if it is the armed one (before
        it runs, or after with `after`); fails once the power is out."""
        if self.dead:
            fail(errno.EIO)
        if not after:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            self.last = f"{kind} {path}"
        if self.armed is None:
            return
        akind, text, n, aafter = self.armed
        if aafter != after or akind not in (kind, "any") or not (text == "*" or path.endswith(text)):
            return
        self.armed = (akind, text, n - 1, aafter)
        if n - 1 == 0:
            self.armed = None
            self.power_cut(f"{'after' if after else 'before'} {kind} {path}")
            if not after:
                fail(errno.EIO)

    def lookup(self, path):
        node = self.root
        for part in path.strip("/").split("/"):
            if not part:
                continue
            if not isinstance(node, Dir):
                fail(errno.ENOTDIR)
            node = node.entries.get(part)
            if node is None:
                fail(errno.ENOENT)
        return node

    def parent_of(self, path):
        head, name = os.path.split(path.rstrip("/"))
        folder = self.lookup(head or "/")
        if not isinstance(folder, Dir):
            fail(errno.ENOTDIR)
        if name == CONTROL and folder is self.root:
            fail(errno.EPERM)
        return folder, name

    def node_of(self, path, fh):
        if fh:
            node = self.handles.get(fh.fh if hasattr(fh, "fh") else fh)
            if node is not None:
                return node
        if path is None:
            fail(errno.EBADF)
        return self.lookup(path)

    def link(self, folder, name, node):
        folder.entries[name] = node
        node.links += 1
        node.name = name
        folder.mtime = folder.ctime = time.time_ns()

    def unlink_entry(self, folder, name):
        node = folder.entries.pop(name)
        node.links -= 1
        node.ctime = folder.mtime = folder.ctime = time.time_ns()
        return node

    def control_text(self):
        state = f"cut: {self.dead}" if self.dead else "live"
        counts = " ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        return f"{state}\nlast: {self.last}\ncounts: {counts}\n".encode()

    def control_write(self, data):
        words = data.decode(errors="replace").split()
        if words == ["cut"]:
            self.power_cut(f"on request, last operation: {self.last}")
        elif len(words) == 2 and words[0] == "tear" and words[1] in ("on", "off"):
            self.tear = words[1] == "on"
        elif len(words) in (4, 5) and words[0] == "arm":
            after = len(words) == 5 and words[4] == "after"
            self.armed = (words[1], words[2], int(words[3]), after)
        else:
            fail(errno.EINVAL)


def operations(fs):
    """The mfusepy operations over `fs` (handles are raw fuse_file_info)."""
    import mfusepy

    class Ops(mfusepy.Operations):
        use_ns = True

        def init_with_config(self, conn, config):
            if config is not None:
                # Every lookup and stat asks the file system (no cached
                # attributes to outlive a cut), removals are real removals
                # (no .fuse_hidden files), and st_ino is ours and stable.
                config.entry_timeout = 0
                config.negative_timeout = 0
                config.attr_timeout = 0
                config.hard_remove = 1
                config.use_ino = 1

        def attrs(self, node):
            if isinstance(node, Dir):
                size, nlink = 4096, 2 + sum(isinstance(c, Dir) for c in node.entries.values())
            else:
                size, nlink = node.size, node.links
            return {
                "st_mode": node.mode,
                "st_ino": node.ino,
                "st_nlink": nlink,
                "st_size": size,
                "st_blocks": (size + 511) // 512,
                "st_blksize": BLOCK,
                "st_uid": node.uid,
                "st_gid": node.gid,
                "st_atime": node.atime,
                "st_mtime": node.mtime,
                "st_ctime": node.ctime,
            }

        def getattr(self, path, fh=None):
            if path == "/" + CONTROL:
                text = fs.control_text()
                return {"st_mode": stat.S_IFREG | 0o600, "st_ino": 1 << 40, "st_nlink": 1,
                        "st_size": len(text), "st_uid": os.getuid(), "st_gid": os.getgid()}
            if fs.dead and path != "/":
                fail(errno.EIO)
            return self.attrs(fs.node_of(path, fh))

        def access(self, path, amode):
            if path != "/" + CONTROL:
                fs.gate("access", path)
                fs.lookup(path)
            return 0

        def statfs(self, path):
            fs.gate("statfs", path)
            st = os.statvfs(fs.backing)
            return {k: getattr(st, k) for k in (
                "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                "f_files", "f_ffree", "f_favail", "f_flag", "f_namemax")}

        def chmod(self, path, mode, fh=None):
            fs.gate("chmod", path or "?")
            node = fs.node_of(path, fh)
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(mode)
            node.ctime = time.time_ns()
            return 0

        def chown(self, path, uid, gid, fh=None):
            fs.gate("chown", path or "?")
            node = fs.node_of(path, fh)
            if uid != 0xFFFFFFFF and uid != -1:
                node.uid = uid
            if gid != 0xFFFFFFFF and gid != -1:
                node.gid = gid
            node.ctime = time.time_ns()
            return 0

        def utimens(self, path, times=None, fh=None):
            fs.gate("utimens", path or "?")
            node = fs.node_of(path, fh)
            now = time.time_ns()
            node.atime, node.mtime = times if times else (now, now)
            return 0

        def readdir(self, path, fh):
            fs.gate("readdir", path)
            folder = fs.lookup(path)
            if not isinstance(folder, Dir):
                fail(errno.ENOTDIR)
            # With use_ino an entry needs its inode number (0 hides it).
            out = [(n, {"st_mode": folder.mode, "st_ino": folder.ino}, 0) for n in (".", "..")]
            for n in sorted(folder.entries):
                node = folder.entries[n]
                out.append((n, {"st_mode": node.mode, "st_ino": node.ino}, 0))
            return out

        def opendir(self, path):
            fs.gate("opendir", path)
            if not isinstance(fs.lookup(path), Dir):
                fail(errno.ENOTDIR)
            return 0

        def fsyncdir(self, path, datasync, fh):
            fs.gate("fsyncdir", path or "?")
            fs.sync_dir(fs.lookup(path))
            fs.gate("fsyncdir", path or "?", after=True)
            return 0

        def mkdir(self, path, mode):
            fs.gate("mkdir", path)
            folder, name = fs.parent_of(path)
            if name in folder.entries:
                fail(errno.EEXIST)
            fs.link(folder, name, Dir(stat.S_IFDIR | stat.S_IMODE(mode)))
            fs.gate("mkdir", path, after=True)
            return 0

        def rmdir(self, path):
            fs.gate("rmdir", path)
            folder, name = fs.parent_of(path)
            node = folder.entries.get(name)
            if node is None:
                fail(errno.ENOENT)
            if not isinstance(node, Dir):
                fail(errno.ENOTDIR)
            if node.entries:
                fail(errno.ENOTEMPTY)
            fs.unlink_entry(folder, name)
            fs.gate("rmdir", path, after=True)
            return 0

        def create(self, path, mode, fi):
            fs.gate("create", path)
            folder, name = fs.parent_of(path)
            node = folder.entries.get(name)
            if node is None:
                node = File(stat.S_IFREG | stat.S_IMODE(mode))
                fs.link(folder, name, node)
            elif fi.flags & os.O_EXCL:
                fail(errno.EEXIST)
            elif isinstance(node, Dir):
                fail(errno.EISDIR)
            elif fi.flags & os.O_TRUNC:
                fs.truncate_volatile(node, 0)
            self.attach(node, fi)
            fs.gate("create", path, after=True)
            return 0

        def attach(self, node, fi):
            handle = fs.next_handle
            fs.next_handle += 1
            fs.handles[handle] = node
            node.opens += 1
            fi.fh = handle

        def open(self, path, fi):
            if path == "/" + CONTROL:
                fi.fh = 0
                fi.direct_io = 1
                return 0
            fs.gate("open", path)
            node = fs.lookup(path)
            if isinstance(node, Dir):
                fail(errno.EISDIR)
            if fi.flags & os.O_TRUNC:
                fs.truncate_volatile(node, 0)
            self.attach(node, fi)
            return 0

        def release(self, path, fi):
            node = fs.handles.pop(fi.fh, None)
            if node is not None:
                node.opens -= 1
            return 0

        def flush(self, path, fi):
            return 0

        def read(self, path, size, offset, fi):
            if fi.fh == 0:
                return fs.control_text()[offset:offset + size]
            node = fs.node_of(path, fi)
            fs.gate("read", node.name)
            return fs.read_volatile(node, offset, size)

        def write(self, path, data, offset, fi):
            if fi.fh == 0:
                fs.control_write(data)
                return len(data)
            node = fs.node_of(path, fi)
            fs.gate("write", node.name)
            fs.write_volatile(node, offset, data)
            fs.gate("write", node.name, after=True)
            return len(data)

        def truncate(self, path, length, fh=None):
            if path == "/" + CONTROL:
                return 0
            node = fs.node_of(path, fh)
            fs.gate("truncate", node.name)
            if isinstance(node, Dir):
                fail(errno.EISDIR)
            fs.truncate_volatile(node, length)
            fs.gate("truncate", node.name, after=True)
            return 0

        def fsync(self, path, datasync, fi):
            if fi.fh == 0:
                return 0
            node = fs.node_of(path, fi)
            fs.gate("fsync", node.name)
            fs.sync_file(node)
            fs.gate("fsync", node.name, after=True)
            return 0

        def unlink(self, path):
            fs.gate("unlink", path)
            folder, name = fs.parent_of(path)
            node = folder.entries.get(name)
            if node is None:
                fail(errno.ENOENT)
            if isinstance(node, Dir):
                fail(errno.EISDIR)
            fs.unlink_entry(folder, name)
            fs.gate("unlink", path, after=True)
            return 0

        def rename(self, old, new, flags=0):
            fs.gate("rename", f"{old} -> {new}")
            if flags & ~1:  # RENAME_NOREPLACE only
                fail(errno.EINVAL)
            sfolder, sname = fs.parent_of(old)
            dfolder, dname = fs.parent_of(new)
            node = sfolder.entries.get(sname)
            if node is None:
                fail(errno.ENOENT)
            if isinstance(node, Dir):
                # Folders are not renamed: see README.md.
                fail(errno.EXDEV)
            target = dfolder.entries.get(dname)
            if target is node:
                return 0
            if target is not None:
                if flags & 1:
                    fail(errno.EEXIST)
                if isinstance(target, Dir):
                    fail(errno.EISDIR)
                fs.unlink_entry(dfolder, dname)
            fs.unlink_entry(sfolder, sname)
            fs.link(dfolder, dname, node)
            fs.gate("rename", f"{old} -> {new}", after=True)
            return 0

    return Ops()


def main(argv):
    if argv[1:] == ["--check"]:
        import mfusepy

        print(f"mfusepy over libfuse {mfusepy.fuse_version_major}.{mfusepy.fuse_version_minor}")
        return 0
    args = argv[1:]
    tear = "--tear" in args
    ignore = "--ignore-fsync" in args
    seed = None
    if "--seed" in args:
        seed = int(args[args.index("--seed") + 1])
        del args[args.index("--seed"):args.index("--seed") + 2]
    paths = [a for a in args if not a.startswith("--")]
    if len(paths) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    backing, mountpoint = paths
    import logging

    import mfusepy

    class LossyFuse(mfusepy.FUSE):
        # mfusepy drops the file handle of truncate (ftruncate): pass it on,
        # so that a file removed while open can still be truncated.
        def truncate_fuse_3(self, path, length, fip):
            return self.operations.truncate(
                None if path is None else path.decode(self.encoding, self.errors),
                length,
                fip.contents if fip else None,
            )

    logging.basicConfig(level=logging.WARNING)
    fs = LossyFs(backing, tear=tear, ignore_fsync=ignore, seed=seed)
    LossyFuse(
        operations(fs),
        mountpoint,
        raw_fi=True,
        foreground=True,
        nothreads=True,
        fsname="lossyfs",
        subtype="lossyfs",
        default_permissions=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
