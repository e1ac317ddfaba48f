"""``python -I -m har_edge.sync.ls_remote <url> <ref prefix>``: list a git remote's refs without a git binary.

Prints the refs under the prefix in ``git ls-remote`` format (``<sha>\t<ref>``,
plus ``<sha>\t<ref>^{}`` for the commit an annotated tag names) through
dulwich, the pure-Python git DVC already brings; exits 1 with one line on
stderr when the remote cannot be listed. Local paths, file://, http(s):// and
ssh URLs (ssh through GIT_SSH_COMMAND). A local repository answers without
peeled entries: they are read from it here.

It runs as a child process (sync.registry) so that ``har_edge.sync.command_timeout_s``
can kill it when an HTTP remote hangs: a thread could not be stopped.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    try:
        from dulwich.client import LocalGitClient, get_transport_and_path
        from dulwich.porcelain import ls_remote
        from dulwich.refs import Ref
        from dulwich.repo import Repo

        url, prefix = argv[0], argv[1].encode()
        refs = {r: s for r, s in ls_remote(url).refs.items() if r.startswith(prefix) and s is not None}
        unpeeled = [r for r in refs if not r.endswith(b"^{}") and r + b"^{}" not in refs]
        client, path = get_transport_and_path(url)
        if unpeeled and isinstance(client, LocalGitClient):
            with Repo(path) as repo:
                for r in unpeeled:
                    commit = repo.get_peeled(r)
                    if commit != refs[r]:  # an annotated tag
                        refs[Ref(r + b"^{}")] = commit
        sys.stdout.write("".join(f"{s.decode()}\t{r.decode()}\n" for r, s in sorted(refs.items())))
        return 0
    except Exception as exc:  # one line for the parent's error message, whatever failed
        sys.stderr.write(": ".join(filter(None, [type(exc).__name__, str(exc).strip()])) + "\n")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
