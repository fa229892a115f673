#!/usr/bin/env python3
"""Writes the documents-to-data fixtures in tests/data/docs/ with the standard library only
(no PDF or DOCX package is needed): a two-page PDF with a text layer, a one-page PDF with
only a drawing (no text layer, as a scan has none), a DOCX with headings, an HTML page, a
Markdown file and a text file; and in bad/, a truncated PDF and a DOCX that is not a zip.
The files are committed; run this again only to change them:

    python3 scripts/make-doc-fixtures.py
"""
import os
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "data", "docs")
# Fixed timestamps so the zip is byte-for-byte reproducible.
ZIP_DATE = (2026, 1, 1, 0, 0, 0)


def pdf(pages):
    """A PDF whose pages each hold `content` (a content stream, bytes)."""
    objects = []  # object bodies, 1-based ids by position

    def add(body):
        objects.append(body)
        return len(objects)

    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    pages_id = len(objects) + 1 + 2 * len(pages)  # after every page and its stream
    kids = []
    for content in pages:
        stream = add(b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream")
        kids.append(
            add(
                b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 612 792] "
                b"/Resources << /Font << /F1 %d 0 R >> >> /Contents %d 0 R >>"
                % (pages_id, font, stream)
            )
        )
    assert add(
        b"<< /Type /Pages /Kids [%s] /Count %d >>"
        % (b" ".join(b"%d 0 R" % k for k in kids), len(kids))
    ) == pages_id
    catalog = add(b"<< /Type /Catalog /Pages %d 0 R >>" % pages_id)
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        catalog,
        xref,
    )
    return bytes(out)


def text_page(paragraphs):
    """A content stream writing each paragraph's lines, a wider gap between paragraphs."""
    ops = [b"BT", b"/F1 11 Tf", b"72 720 Td"]
    for p, lines in enumerate(paragraphs):
        if p:
            ops.append(b"0 -30 Td")
        for i, line in enumerate(lines):
            if i:
                ops.append(b"0 -14 Td")
            esc = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            ops.append(b"(" + esc.encode("cp1252") + b") Tj")
    ops.append(b"ET")
    return b"\n".join(ops)


PDF_PAGES = [
    [
        ["Hand hygiene in clinical care.", "Clean hands are the most effective way to stop"],
        ["the spread of infection between patients."],
        ["Use an alcohol-based hand rub for at least 20 seconds", "when hands are not visibly soiled."],
    ],
    [
        ["Wash with soap and water when hands are visibly dirty,", "after caring for a patient with diarrhoea,"],
        ["and before eating. Dry hands with a single-use towel."],
    ],
]

DOCX_PARAS = [
    ("Title", "Sterile Field Guide"),
    ("Heading1", "Preparing the field"),
    (None, "Open sterile packs away from the body and keep them above waist level."),
    (None, "Anything below the table edge is considered contaminated."),
    ("Heading1", "Keeping it sterile"),
    (None, "Never turn your back on a sterile field & never reach across it."),
]


def docx():
    w = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
    body = []
    for style, text in DOCX_PARAS:
        ppr = '<w:pPr><w:pStyle w:val="%s"/></w:pPr>' % style if style else ""
        esc = text.replace("&", "&amp;").replace("<", "&lt;")
        # Two runs per paragraph, split at a space, as Word writes them.
        half = esc.rfind(" ", 0, len(esc) // 2 + 1)
        half = half if half > 0 else len(esc)
        runs = "".join(
            '<w:r><w:t xml:space="preserve">%s</w:t></w:r>' % part
            for part in (esc[:half], esc[half:])
            if part
        )
        body.append("<w:p>%s%s</w:p>" % (ppr, runs))
    document = (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
        '<w:document xmlns:w="%s"><w:body>%s<w:sectPr/></w:body></w:document>' % (w, "".join(body))
    )
    content_types = (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
        '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        '<Default Extension="xml" ContentType="application/xml"/>'
        '<Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/>'
        "</Types>"
    )
    rels = (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
        '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
        '<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" Target="word/document.xml"/>'
        "</Relationships>"
    )
    path = os.path.join(OUT, "sterile-field.docx")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in [
            ("[Content_Types].xml", content_types),
            ("_rels/.rels", rels),
            ("word/document.xml", document),
        ]:
            info = zipfile.ZipInfo(name, ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)


HTML = """<!DOCTYPE html>
<html><head><title>Gloves</title><style>p { color: red }</style>
<script>var ignored = "not text";</script></head>
<body>
<h1>Glove use</h1>
<p>Gloves do not replace <b>hand hygiene</b>. Clean hands before putting gloves on
and after taking them off.</p>
<h2>When to change gloves</h2>
<ul><li>Between patients.</li><li>When moving from a dirty to a clean body site.</li></ul>
</body></html>
"""

MARKDOWN = """# Sharps safety

Never recap a used needle.

## Disposal

Drop used sharps straight into a puncture-proof container at the point of use.
Close the container when it is three quarters full.

## After an injury

- Let the wound bleed freely.
- Wash it with soap and water.
- Report the injury at once.
"""

TEXT = """Cleaning schedule for the ward.

Wipe bed rails and call buttons with disinfectant every shift.

Mop floors twice a day and whenever a spill happens.
"""


def main():
    os.makedirs(os.path.join(OUT, "bad"), exist_ok=True)
    os.makedirs(os.path.join(OUT, "scanned"), exist_ok=True)
    good = pdf([text_page(p) for p in PDF_PAGES])
    with open(os.path.join(OUT, "hand-hygiene.pdf"), "wb") as f:
        f.write(good)
    # A scan: the page is an image (here a drawn rectangle) and there is no text at all.
    with open(os.path.join(OUT, "scanned", "scan.pdf"), "wb") as f:
        f.write(pdf([b"0.5 g 72 72 468 648 re f"]))
    docx()
    with open(os.path.join(OUT, "gloves.html"), "w") as f:
        f.write(HTML)
    with open(os.path.join(OUT, "sharps.md"), "w") as f:
        f.write(MARKDOWN)
    with open(os.path.join(OUT, "cleaning.txt"), "w") as f:
        f.write(TEXT)
    with open(os.path.join(OUT, "bad", "truncated.pdf"), "wb") as f:
        f.write(good[: len(good) // 3])
    with open(os.path.join(OUT, "bad", "not-a-zip.docx"), "wb") as f:
        f.write(b"PK\x03\x04 this is not really a zip archive")


if __name__ == "__main__":
    main()
