#!/usr/bin/env python3
"""Model check of the warp-specialized attention kernel's tile schedule (attn_fwd_ws in
runtime/kernels/attention.cu), on the CPU, in a few seconds.

The producer warpgroup loads the union of two (or three) query blocks' key-block lists, then their column
tiles, into a ring of NS stages; each consumer warpgroup computes only its own tiles and holds its
current tile while it waits for its next one. This script replays the producer's generator (same
rules as the kernel) on random lists and runs producer and consumers under random interleavings,
checking that (1) nothing deadlocks, (2) each warpgroup computes exactly its own blocks and column
tiles, once each, and (3) no warpgroup is passed by more than NS - 2 tiles in a row before its last.

With --union (the kernels' default since c7fd1b8 when the blocks have columns) the blocks' columns
come as one list of union tiles, each tagged for every warpgroup whose block exists (the last group
of a head may be short; one block alone gets untagged tiles): the check then also covers the done
and force rules of that mode.

It checks the protocol as designed, not the CUDA code itself; keep the two in step. The default is
the kernel's protocol since c4db20c: a tile is announced by its own copies (TMA transaction bytes or
cp.async.mbarrier.arrive), at any later time and in any order, never by the producer; the producer
waits for the consumers' Q loads before its first write to the last stage (where the Q tiles
passed). --protocol delayed runs edfc24c's (up to two issued tiles unannounced, all announced before
the producer blocks) and --protocol old the first version (one issued tile unannounced, no
announcement before blocking), which this check shows can deadlock.
With --consumers 3 (attn_fwd_ws3_d64: query blocks 3p..3p+2, 11 stages, Q outside the stages;
attn_fwd_ws3_d128 the same with 5 stages, --ns 5) the same rules run for three warpgroups; a warpgroup passed by NS - 3 tiles is forced, the one passed by the
most first, so that two owed a tile at once both get one within NS - 2.
usage: scripts/gpu/ws-schedule.py [--trials N] [--consumers 2|3] [--ns NS] [--protocol async|delayed|old] [--union]
"""
import argparse
import random
import sys

NONE = 1 << 60
DONE, END, UNI = 8, 64, 128


def schedule(lists, cols, ns, uni=False, blocks=None):
    """The producer's tile sequence: [(item, tag)], item = ('b', block) or ('c<w>', tile), for
    len(lists) consumer warpgroups (2 or 3), warpgroup w computing the key blocks lists[w] and
    cols[w] column tiles. With `uni`, cols[0] counts the group's union tiles ('c0', shared by the
    warpgroups whose query block exists: the first `blocks`) and the other cols must be 0."""
    nc = len(lists)
    force_at = ns - nc
    live = (1 << (nc if blocks is None else blocks)) - 1
    shared_cols = uni and live > 1
    block = lambda w, i: lists[w][i] if i < len(lists[w]) else NONE
    ib, jc = [0] * nc, [0] * nc
    vb = [block(w, 0) for w in range(nc)]
    since = [-(1 << 30)] * nc
    pend = 0

    def cols_left(w):
        return (live >> w & 1) and jc[0] < cols[0] if shared_cols and w > 0 else jc[w] < cols[w]

    done = [vb[w] == NONE and not cols_left(w) for w in range(nc)]
    out = []
    while not all(done):
        force, most = -1, force_at - 1
        for w in range(nc):
            if not done[w] and since[w] > most:
                force, most = w, since[w]
        kb = colw = -1
        if force >= 0:
            if vb[force] != NONE:
                kb = vb[force]
            else:
                colw = force
        elif min(vb) != NONE:
            kb = min(vb)
        else:
            fewest = 1 << 30
            for w in range(nc):
                if jc[w] < cols[w] and jc[w] < fewest:
                    colw, fewest = w, jc[w]
        if uni and colw >= 0:
            colw = 0  # one column sequence, for both
        tag = 0
        if kb >= 0:
            for w in range(nc):
                if vb[w] == kb:
                    tag |= 1 << w
                    ib[w] += 1
                    vb[w] = block(w, ib[w])
            item = ('b', kb)
        else:
            tag = live | UNI if shared_cols else 1 << colw
            item = (f'c{colw}', jc[colw])
            jc[colw] += 1
        for w in range(nc):
            since[w] = 0 if (tag >> w) & 1 else since[w] + 1
        tag |= pend
        pend = 0
        for w in range(nc):
            if not done[w] and vb[w] == NONE and not cols_left(w):
                done[w], pend = True, pend | DONE << w
        out.append((item, tag))
    out.append((('end', 0), END))
    return out


def run(tiles, ns, rng, protocol, nc=2):
    """Random interleaving of producer, copies and consumers; returns what each warpgroup computed."""
    n_tiles = len(tiles)
    released = [set() for _ in range(nc)]
    issued = 0  # tiles whose copies were issued
    published = 0  # delayed/old protocols: tiles [0, published) announced on `full`
    landed = set()  # async protocol: tiles whose copies have landed (announced)
    # async protocol: each consumer's Q tile is in registers (with two consumers the Q tiles pass
    # through the last stage; with three they have their own)
    q_loaded = [False] * nc
    q_in_stage = nc == 2
    wgs = [{'t': -1, 'cur': None, 'state': 'run', 'got': []} for _ in range(nc)]

    def stage_free(t):
        return t < ns or all((t - ns) in released[w] for w in range(nc))

    def announced(t):
        return t in landed if protocol == 'async' else t < published

    def producer():
        nonlocal issued, published
        t = issued
        if protocol == 'async':
            if t >= n_tiles or not stage_free(t) or (q_in_stage and t == ns - 1 and not all(q_loaded)):
                return False
            issued += 1
            return True
        if t >= n_tiles:
            if published < n_tiles:
                published = n_tiles
                return True
            return False
        if not stage_free(t):
            if protocol == 'delayed' and published < t:  # announce everything before blocking
                published = t
                return True
            return False
        issued += 1
        if protocol == 'old':
            if t - published == 1:
                published += 1
        elif t - published == 2:
            published += 1
        return True

    def copies():  # async protocol: some issued tile's copies land (any order)
        waiting = [t for t in range(issued) if t not in landed]
        if protocol != 'async' or not waiting:
            return False
        landed.add(rng.choice(waiting))
        return True

    def consumer(w):
        c = wgs[w]
        if c['state'] == 'end':
            return False
        if not q_loaded[w]:
            q_loaded[w] = True
            return True
        t = c['t'] + 1
        if t >= n_tiles or not announced(t):
            return False
        c['t'] = t
        item, tag = tiles[t]
        if c['state'] == 'drain':
            if tag & END:
                c['state'] = 'end'
            else:
                released[w].add(t)
            return True
        if tag & (END | DONE << w):
            if c['cur'] is not None:
                released[w].add(c['cur'])
                c['cur'] = None
            if tag & END:
                c['state'] = 'end'
            else:
                released[w].add(t)
                c['state'] = 'drain'
            return True
        if (tag >> w) & 1:
            c['got'].append(item)
            if c['cur'] is not None:
                released[w].add(c['cur'])
            c['cur'] = t
            return True
        released[w].add(t)
        return True

    while True:
        actors = ['p', 'c'] + list(range(nc))
        rng.shuffle(actors)
        step = {'p': producer, 'c': copies}
        if not any(step[a]() if a in step else consumer(a) for a in actors):
            if all(c['state'] == 'end' for c in wgs):
                return [c['got'] for c in wgs]
            raise RuntimeError(f"deadlock: issued {issued}, published {published}, landed "
                               f"{len(landed)}, warpgroups at tiles {[c['t'] for c in wgs]} "
                               f"holding {[c['cur'] for c in wgs]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--trials', type=int, default=20000)
    ap.add_argument('--consumers', type=int, choices=[2, 3], default=2,
                    help="consumer warpgroups: 2 (attn_fwd_ws_d*), 3 (attn_fwd_ws3_d64)")
    ap.add_argument('--ns', type=int, help="stages (default: the kernel's, 6 with two consumers, 11 with three)")
    ap.add_argument('--seed', type=int, default=1)
    ap.add_argument('--protocol', choices=['async', 'delayed', 'old'], default='async')
    ap.add_argument('--union', action='store_true', help="one union column list for both warpgroups")
    o = ap.parse_args()
    nc = o.consumers
    ns = o.ns or (6 if nc == 2 else 11)
    rng = random.Random(o.seed)
    for trial in range(o.trials):
        nb = rng.randint(1, 40)
        lists = [sorted(rng.sample(range(nb), rng.randint(0, nb)))]
        for w in range(1, nc):
            lists.append(sorted(rng.sample(range(nb + w), rng.randint(0, nb + w))) if rng.random() < 0.9 else [])
        cols = [rng.randint(0, 8)] + [rng.randint(0, 8) if lists[w] or rng.random() < 0.5 else 0 for w in range(1, nc)]
        blocks = nc
        if o.union:
            if rng.random() < 0.3:  # the last group of a head may have fewer blocks
                blocks = rng.randint(1, nc - 1)
                for w in range(blocks, nc):
                    lists[w] = []
            for w in range(1, nc):
                cols[w] = 0
        tiles = schedule(lists, cols, ns, o.union, blocks)
        try:
            got = run(tiles, ns, rng, o.protocol, nc)
        except RuntimeError as e:
            print(f"trial {trial}: {e}")
            return 1
        for w in range(nc):
            if o.union:  # all compute every union tile ('c0') if their block exists
                want = [('b', x) for x in lists[w]] + [('c0', j) for j in range(cols[0]) if w < blocks]
            else:
                want = [('b', x) for x in lists[w]] + [(f'c{w}', j) for j in range(cols[w])]
            if sorted(got[w]) != sorted(want) or len(got[w]) != len(set(got[w])):
                print(f"trial {trial}: warpgroup {w} computed {got[w]}, wants {want}")
                return 1
            own = []
            for i, (_, tag) in enumerate(tiles):
                if (tag >> w) & 1 or tag & (END | DONE << w):
                    own.append(i)
                if tag & (END | DONE << w):
                    break
            if any(y - x > ns - 1 for x, y in zip(own, own[1:])):
                print(f"trial {trial}: warpgroup {w} passed by more than {ns - 2} tiles: {own}")
                return 1
    print(f"{o.trials} random schedules ({nc} consumers, NS = {ns}, protocol {o.protocol}"
          f"{', union columns' if o.union else ''}): no deadlock, every warpgroup computed exactly its tiles")
    return 0


if __name__ == '__main__':
    sys.exit(main())
