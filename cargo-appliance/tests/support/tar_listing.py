#!/usr/bin/env python3
"""Print a canonical listing of a tar archive, read by Python's tarfile (an implementation
independent of ours), one JSON object per entry, sorted by path.

Hard links are listed as files with their target's content digest, plus the group they
belong to, so archives that pick a different first path for a link group compare equal."""
import hashlib
import json
import sys
import tarfile


def norm(name):
    name = name.lstrip("/")
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/") if name not in (".", "") else ""


def main(path):
    entries = {}
    digests = {}
    links = []
    with tarfile.open(path, "r:*") as archive:
        for member in archive:
            name = norm(member.name)
            entry = {
                "path": name,
                "mode": oct(member.mode & 0o7777),
                "uid": member.uid,
                "gid": member.gid,
            }
            if member.isreg():
                data = archive.extractfile(member).read()
                digest = hashlib.sha256(data).hexdigest()
                digests[name] = (digest, len(data))
                entry.update(type="file", size=len(data), sha256=digest)
            elif member.isdir():
                entry.update(type="dir")
            elif member.issym():
                entry.update(type="symlink", target=member.linkname)
            elif member.islnk():
                links.append((name, norm(member.linkname)))
                entry.update(type="file")
            elif member.ischr() or member.isblk():
                entry.update(type="chr" if member.ischr() else "blk", major=member.devmajor, minor=member.devminor)
            elif member.isfifo():
                entry.update(type="fifo")
            else:
                entry.update(type="other")
            entries[name] = entry
    link_of = dict(links)
    groups = {}
    for name, target in links:
        root = target
        while root in link_of:
            root = link_of[root]
        digest, size = digests[root]
        entries[name].update(size=size, sha256=digest)
        groups.setdefault(root, {root}).add(name)
    for group in groups.values():
        members = sorted(group)
        for name in members:
            entries[name]["hardlink_group"] = members
    for name in sorted(entries):
        print(json.dumps(entries[name], sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1])
