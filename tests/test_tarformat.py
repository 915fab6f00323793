"""Tests of tarformat: headers we write, headers we read, every check."""
import io
import os
import subprocess
import tarfile
import tempfile
import unittest

from iotstack_backup import tarformat


class TarFormatTest(unittest.TestCase):
    def read_back(self, data):
        with tarfile.open(fileobj=io.BytesIO(data + bytes(1024)), mode="r:") as tf:
            return tf.getmembers()

    def test_header_is_read_by_tarfile_and_our_reader(self):
        long_dir = "volumes/" + "d" * 90 + "/" + "e" * 90
        table = [
            (b"volumes/a.txt", tarformat.TYPE_FILE, 0o4755, 1000, 472, 5, 1_700_000_000, b""),
            (long_dir.encode() + b"/f.txt", tarformat.TYPE_FILE, 0o644, 0, 0, 0, 1, b""),
            (b"v/" + b"x" * 300, tarformat.TYPE_FILE, 0o600, 3_000_000, 4_000_000, 0, 0, b""),
            (b"v/link", tarformat.TYPE_SYMLINK, 0o777, 1, 2, 0, 5, b"/" + b"t" * 150),
            ("v/ünï cödé".encode(), tarformat.TYPE_DIR, 0o1777, 0, 0, 0, 7, b""),
            (b"v/old", tarformat.TYPE_FILE, 0o644, 0, 0, 0, -86400, b""),
        ]
        for name, kind, mode, uid, gid, size, mtime, link in table:
            data = tarformat.tar_header(name, kind, mode, uid, gid, size, mtime, link)
            data += b"a" * size + bytes(-size % 512)
            self.assertEqual(len(data) % 512, 0)
            (info,) = self.read_back(data)
            self.assertEqual(info.name, name.decode().rstrip("/"))
            self.assertEqual((info.mode, info.uid, info.gid, info.size, int(info.mtime)),
                             (mode, uid, gid, size, mtime))
            self.assertEqual((info.uname, info.gname), ("", ""))
            self.assertEqual(info.linkname, link.decode())
            (ours,) = list(tarformat.TarReader([data, bytes(1024)]))
            self.assertEqual((ours.name, ours.mode, ours.uid, ours.gid, ours.size, ours.mtime,
                              ours.linkname), (name.decode(), mode, uid, gid, size, mtime,
                                               link.decode()))

    def test_header_checksum_forms(self):
        def with_checksum(header, text):
            return header[:148] + text + header[156:]

        header = tarformat.tar_header("volumes/é".encode(), tarformat.TYPE_FILE, 0o644, 0, 0, 0, 0)
        field = header[148:156]
        self.assertRegex(field, rb"^[0-7]{6}\0 $")  # what GNU tar writes
        unsigned = int(field[:6], 8)
        # é is two bytes above 127: a tar summing signed bytes gets 512 less.
        table = [
            (field, True),
            (b"%07o\0" % unsigned, True),
            (b"%6o\0 " % unsigned, True),
            (b"%06o\0 " % (unsigned - 512), True),
            (b"%06o\0 " % (unsigned + 1), False),
            (b"%06o\0 " % (unsigned - 256), False),
            (b"        ", False),
        ]
        for text, ok in table:
            self.assertEqual(tarformat.header_checksum_ok(with_checksum(header, text)), ok, text)

    def test_gnu_tar_reads_long_names(self):
        name = ("volumes/" + "n" * 120 + "/" + "m" * 140).encode()
        data = tarformat.tar_header(name, tarformat.TYPE_FILE, 0o640, 1883, 1883, 3, 0) + b"abc" + bytes(509)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "a.tar")
            with open(path, "wb") as f:
                f.write(data + bytes(1024))
            listing = subprocess.run(["tar", "-tvf", path, "--numeric-owner"],
                                     stdout=subprocess.PIPE, check=True).stdout.decode()
        self.assertIn("1883/1883", listing)
        self.assertIn(name.decode(), listing)

    def test_split_ustar_name(self):
        self.assertEqual(tarformat.split_ustar_name(b"a/b"), (b"", b"a/b"))
        prefix, rest = tarformat.split_ustar_name(b"p" * 150 + b"/" + b"n" * 99)
        self.assertEqual((len(prefix), len(rest)), (150, 99))
        self.assertIsNone(tarformat.split_ustar_name(b"x" * 101))
        self.assertIsNone(tarformat.split_ustar_name(b"p" * 156 + b"/n"))

    def test_pax_record_length_counts_itself(self):
        for value in (b"", b"x" * 5, b"x" * 93, b"x" * 994, b"x" * 9995):
            record = tarformat.pax_record(b"path", value)
            self.assertEqual(int(record.split(b" ", 1)[0]), len(record))

    def test_parse_number(self):
        table = [(b"0000644\0", 0o644), (b"       \0", 0), (b"\0" * 8, 0),
                 (b"\x80" + bytes(6) + b"\x10", 16), (b"  17 \0", 0o17)]
        for field, value in table:
            self.assertEqual(tarformat.parse_number(field), value)
        for bad in (b"12x\0", b"-1\0", b"+7\0", b"7_7\0"):
            with self.assertRaises(tarformat.ArchiveError, msg=bad):
                tarformat.parse_number(bad)

    def test_hostile_pax_numbers_are_archive_errors(self):
        for record in (b"uid=abc", b"gid=-5", b"size=1e3", b"mtime=nan", b"mtime=inf",
                       b"uid=99999999999999999999999999x", b"uid=4294967295",
                       b"gid=99999999999999999999", b"mtime=1e300"):
            key, value = record.split(b"=")
            data = tarformat.pax_record(key, value)
            pax = tarformat.tar_header(b"PaxHeaders/a", b"x", 0o644, 0, 0, len(data), 0)
            member = tarformat.tar_header(b"volumes/a", tarformat.TYPE_FILE, 0o644, 0, 0, 0, 0)
            stream = pax + data + bytes(-len(data) % 512) + member + bytes(1024)
            with self.assertRaises(tarformat.ArchiveError, msg=record):
                list(tarformat.TarReader([stream]))

    def test_reader_refuses_damaged_headers(self):
        good = tarformat.tar_header(b"a", tarformat.TYPE_FILE, 0o644, 0, 0, 0, 0)
        flipped = bytearray(good)
        flipped[10] ^= 0x01
        with self.assertRaisesRegex(tarformat.ArchiveError, "corrupt tar header"):
            list(tarformat.TarReader([bytes(flipped)]))
        with self.assertRaisesRegex(tarformat.ArchiveError, "truncated"):
            list(tarformat.TarReader([good[:300]]))
        data_member = tarformat.tar_header(b"a", tarformat.TYPE_FILE, 0o644, 0, 0, 1000, 0) + b"x" * 600
        with self.assertRaisesRegex(tarformat.ArchiveError, "truncated"):
            list(tarformat.TarReader([data_member]))
        odd = bytearray(tarformat.tar_header(b"a", b"S", 0o644, 0, 0, 0, 0))
        with self.assertRaisesRegex(tarformat.ArchiveError, "unsupported"):
            list(tarformat.TarReader([bytes(odd)]))


if __name__ == "__main__":
    unittest.main()
