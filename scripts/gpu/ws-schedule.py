#!/usr/bin/env python3
"""Model check of the warp-specialized attention kernel's tile schedule (attn_fwd_ws in
runtime/kernels/attention.cu), on the CPU, in a few seconds.

The producer warpgroup loads the union of two query blocks' key-block lists, then their column
tiles, into a ring of NS stages; each consumer warpgroup computes only its own tiles and holds its
current tile while it waits for its next one. This script replays the producer's generator (same
rules as the kernel) on random lists and runs producer and consumers under random interleavings,
checking that (1) nothing deadlocks, (2) each warpgroup computes exactly its own blocks and column
tiles, once each, and (3) no warpgroup is passed by more than NS - 2 tiles in a row before its last.

With --union (the kernel's default since c7fd1b8 when the pair has columns) the two blocks' columns
come as one list of union tiles, each tagged for both warpgroups (for warpgroup 0 only when block
2p+1 does not exist): the check then also covers the done and force rules of that mode.

It checks the protocol as designed, not the CUDA code itself; keep the two in step. The default is
the kernel's protocol since c4db20c: a tile is announced by its own copies (TMA transaction bytes or
cp.async.mbarrier.arrive), at any later time and in any order, never by the producer; the producer
waits for the consumers' Q loads before its first write to the last stage (where the Q tiles
passed). --protocol delayed runs edfc24c's (up to two issued tiles unannounced, all announced before
the producer blocks) and --protocol old the first version (one issued tile unannounced, no
announcement before blocking), which this check shows can deadlock.
usage: scripts/gpu/ws-schedule.py [--trials N] [--ns NS] [--protocol async|delayed|old] [--union]
"""
import argparse
import random
import sys

NONE = 1 << 60
END, DONE, UNI = 4, 8, 32


def schedule(a, b, ca, cb, ns, uni=False, has1=True):
    """The producer's tile sequence: [(item, tag)], item = ('b', block) or ('c0'/'c1', tile). With
    `uni`, `ca` counts the pair's union tiles ('c0', shared by both warpgroups when `has1`) and `cb`
    must be 0."""
    shared_cols = uni and has1
    ia = ib = ja = jb = 0
    block_a = lambda i: a[i] if i < len(a) else NONE
    block_b = lambda i: b[i] if i < len(b) else NONE
    va, vb = block_a(0), block_b(0)
    since0 = since1 = -(1 << 30)
    pend = 0
    done0 = va == NONE and ca == 0
    done1 = vb == NONE and (ca == 0 if shared_cols else cb == 0)
    out = []
    while not (done0 and done1):
        force = 0 if since0 >= ns - 2 and not done0 else (1 if since1 >= ns - 2 and not done1 else -1)
        kb = colw = -1
        if force == 0:
            kb, colw = (va, -1) if va != NONE else (-1, 0)
        elif force == 1:
            kb, colw = (vb, -1) if vb != NONE else (-1, 1)
        elif va != NONE or vb != NONE:
            kb = min(va, vb)
        else:
            colw = 0 if ja < ca and (jb >= cb or ja <= jb) else 1
        if uni and colw >= 0:
            colw = 0  # one column sequence, for both
        if kb >= 0:
            tag = (1 if va == kb else 0) | (2 if vb == kb else 0)
            if va == kb:
                ia += 1
                va = block_a(ia)
            if vb == kb:
                ib += 1
                vb = block_b(ib)
            item = ('b', kb)
        else:
            tag = 3 | UNI if shared_cols else 1 << colw
            if colw == 0:
                item, ja = ('c0', ja), ja + 1
            else:
                item, jb = ('c1', jb), jb + 1
        since0 = 0 if tag & 1 else since0 + 1
        since1 = 0 if tag & 2 else since1 + 1
        tag |= pend
        pend = 0
        if not done0 and va == NONE and ja >= ca:
            done0, pend = True, pend | DONE
        if not done1 and vb == NONE and (ja >= ca if shared_cols else jb >= cb):
            done1, pend = True, pend | DONE << 1
        out.append((item, tag))
    out.append((('end', 0), END))
    return out


def run(tiles, ns, rng, protocol):
    """Random interleaving of producer, copies and consumers; returns what each warpgroup computed."""
    n_tiles = len(tiles)
    released = [set(), set()]
    issued = 0  # tiles whose copies were issued
    published = 0  # delayed/old protocols: tiles [0, published) announced on `full`
    landed = set()  # async protocol: tiles whose copies have landed (announced)
    q_loaded = [False, False]  # async protocol: each consumer's Q tile is in registers
    wgs = [{'t': -1, 'cur': None, 'state': 'run', 'got': []} for _ in range(2)]

    def stage_free(t):
        return t < ns or ((t - ns) in released[0] and (t - ns) in released[1])

    def announced(t):
        return t in landed if protocol == 'async' else t < published

    def producer():
        nonlocal issued, published
        t = issued
        if protocol == 'async':
            if t >= n_tiles or not stage_free(t) or (t == ns - 1 and not all(q_loaded)):
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
        actors = ['p', 'c', 0, 1]
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
    ap.add_argument('--ns', type=int, default=6)
    ap.add_argument('--seed', type=int, default=1)
    ap.add_argument('--protocol', choices=['async', 'delayed', 'old'], default='async')
    ap.add_argument('--union', action='store_true', help="one union column list for both warpgroups")
    o = ap.parse_args()
    rng = random.Random(o.seed)
    for trial in range(o.trials):
        nb = rng.randint(1, 40)
        a = sorted(rng.sample(range(nb), rng.randint(0, nb)))
        b = sorted(rng.sample(range(nb + 1), rng.randint(0, nb + 1))) if rng.random() < 0.9 else []
        ca = rng.randint(0, 8)
        cb = rng.randint(0, 8) if b or rng.random() < 0.5 else 0
        has1 = True
        if o.union:
            has1 = bool(b) or rng.random() < 0.5  # a pair's second block may not exist
            if not has1:
                b = []
            cb = 0
        tiles = schedule(a, b, ca, cb, o.ns, o.union, has1)
        try:
            got = run(tiles, o.ns, rng, o.protocol)
        except RuntimeError as e:
            print(f"trial {trial}: {e}")
            return 1
        for w, (blocks, cols) in enumerate([(a, ca), (b, cb)]):
            if o.union:  # both compute every union tile ('c0'); warpgroup 1 only if block 2p+1 exists
                want = [('b', x) for x in blocks] + [('c0', j) for j in range(ca) if w == 0 or has1]
            else:
                want = [('b', x) for x in blocks] + [(f'c{w}', j) for j in range(cols)]
            if sorted(got[w]) != sorted(want) or len(got[w]) != len(set(got[w])):
                print(f"trial {trial}: warpgroup {w} computed {got[w]}, wants {want}")
                return 1
            own = []
            for i, (_, tag) in enumerate(tiles):
                if (tag >> w) & 1 or tag & (END | DONE << w):
                    own.append(i)
                if tag & (END | DONE << w):
                    break
            if any(y - x > o.ns - 1 for x, y in zip(own, own[1:])):
                print(f"trial {trial}: warpgroup {w} passed by more than {o.ns - 2} tiles: {own}")
                return 1
    print(f"{o.trials} random schedules (NS = {o.ns}, protocol {o.protocol}{', union columns' if o.union else ''}): "
          f"no deadlock, every warpgroup computed exactly its tiles")
    return 0


if __name__ == '__main__':
    sys.exit(main())
