#!/usr/bin/python3
"""Generate a vendor invoice CSV for benchmarks and the demo.

  gen_invoices.py N [--dup-rate 0.05] [--bad-rate 0.005] [--staged-file F] [--seed 1]

Writes N lines (plus a header) to stdout.  A share of the lines are
duplicates with other case and blanks: half repeat an earlier line of the
same file, half repeat an invoice listed in --staged-file (already staged
before this load).  Another share is malformed (bad date, bad amount, empty
vendor, bad currency, broken payload).
"""
import argparse
import random
import sys


def key_variant(rng, s):
    """The same key as D365 sees it: other case, surrounding blanks."""
    s = s.lower() if rng.random() < 0.5 else s.upper()
    return rng.choice(['', ' ', '  ']) + s + rng.choice(['', ' ', '\t'])


BAD = [
    lambda r: r.__setitem__(2, '2024-02-30'),
    lambda r: r.__setitem__(3, '1,000.00'),
    lambda r: r.__setitem__(0, ''),
    lambda r: r.__setitem__(4, 'EURO'),
    lambda r: r.__setitem__(6, '{"broken": '),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('n', type=int)
    ap.add_argument('--dup-rate', type=float, default=0.05)
    ap.add_argument('--bad-rate', type=float, default=0.005)
    ap.add_argument('--staged-file')
    ap.add_argument('--prefix', default='INV')
    ap.add_argument('--seed', type=int, default=1)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    staged = []
    if a.staged_file:
        with open(a.staged_file) as f:
            next(f)
            staged = [line.split(',')[:2] for line in f]
    out = sys.stdout
    out.write('vendor_account,invoice_number,invoice_date,amount,currency,description,payload\n')
    seen = []
    for i in range(a.n):
        x = rng.random()
        if x < a.dup_rate and (seen or staged):
            pool = staged if (staged and (not seen or rng.random() < 0.5)) else seen
            v, inv = rng.choice(pool)
            row = [key_variant(rng, v), key_variant(rng, inv)]
        else:
            row = ['V%05d' % rng.randrange(1, 5000), '%s-%08d' % (a.prefix, i)]
            if len(seen) < 100000:
                seen.append(row[:])
        row += ['2024-%02d-%02d' % (rng.randrange(1, 13), rng.randrange(1, 29)),
                '%d.%02d' % (rng.randrange(1, 100000), rng.randrange(100)),
                rng.choice(['EUR', 'USD', 'GBP']),
                'Office supplies order %d' % i, '']
        if rng.random() < a.bad_rate:
            rng.choice(BAD)(row)
        out.write(','.join('"%s"' % c.replace('"', '""') if (',' in c or '"' in c) else c
                           for c in row) + '\n')


if __name__ == '__main__':
    main()
