/*
 * Guest-side memory hog for the QEMU swap test (built with gcc -static -O2).
 *
 *   hog MIB [SAME]
 *                allocate MIB MiB, fill every page with a pattern unique to
 *                (page, word), read it all back and verify it, then print
 *                "HOG pages=N bad=B" and "VMSTAT pswpin=X pswpout=Y".
 *                Exit 0 only if every page verified. With SAME (percent),
 *                that share of the pages, spread evenly, is same-filled
 *                instead: one 8-byte word repeated, zero for 7 in 8 of them
 *                (as a process's cleared memory mostly is).
 *   hog --exit N write N to QEMU's isa-debug-exit port (0xf4), which ends
 *                QEMU with status 2N+1; the initramfs has no other way to
 *                hand a result to the host.
 *
 * The memory is plain malloc (never mlock): the point is for the guest
 * kernel to push it out to the swap disk and fault it back in.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>

#define PAGE 4096UL
#define WORDS (PAGE / sizeof(uint64_t))
#define DEBUG_EXIT_PORT 0xf4

/* splitmix64 finaliser: every word of every page gets a distinct value, so a
 * page swapped back into the wrong slot, a stale page or a zero page is caught. */
static uint64_t pattern(uint64_t page, uint64_t word)
{
	uint64_t z = page * WORDS + word + 0x9e3779b97f4a7c15ULL;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

/* Page p of a hog with `same` percent of same-filled pages: its word number i. */
static unsigned same_pct;

static uint64_t word_of(uint64_t page, uint64_t word)
{
	if (page * 37 % 100 < same_pct)
		return page % 8 == 0 ? pattern(page, 0) : 0;
	return pattern(page, word);
}

static int debug_exit(const char *arg)
{
	char *end;
	long code = strtol(arg, &end, 10);
	if (*arg == '\0' || *end != '\0' || code < 0 || code > 255) {
		fprintf(stderr, "hog: bad exit code '%s'\n", arg);
		return 2;
	}
	if (ioperm(DEBUG_EXIT_PORT, 4, 1) != 0) {
		fprintf(stderr, "hog: ioperm: %s\n", strerror(errno));
		return 2;
	}
	fflush(NULL);
	outb((unsigned char)code, DEBUG_EXIT_PORT);
	/* Only reached if QEMU has no isa-debug-exit device. */
	fprintf(stderr, "hog: isa-debug-exit did not end the VM\n");
	return 2;
}

static int print_vmstat(void)
{
	FILE *f = fopen("/proc/vmstat", "r");
	char key[64];
	unsigned long long val, in = 0, out = 0;
	int found = 0;

	if (!f) {
		fprintf(stderr, "hog: /proc/vmstat: %s\n", strerror(errno));
		return -1;
	}
	while (fscanf(f, "%63s %llu", key, &val) == 2) {
		if (strcmp(key, "pswpin") == 0) {
			in = val;
			found |= 1;
		} else if (strcmp(key, "pswpout") == 0) {
			out = val;
			found |= 2;
		}
	}
	fclose(f);
	if (found != 3) {
		fprintf(stderr, "hog: pswpin/pswpout missing from /proc/vmstat\n");
		return -1;
	}
	printf("VMSTAT pswpin=%llu pswpout=%llu\n", in, out);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 3 && strcmp(argv[1], "--exit") == 0)
		return debug_exit(argv[2]);
	if (argc != 2 && argc != 3) {
		fprintf(stderr, "usage: hog MIB [SAME_PERCENT] | hog --exit N\n");
		return 2;
	}
	if (argc == 3) {
		char *rest;
		unsigned long pct = strtoul(argv[2], &rest, 10);
		if (*argv[2] == '\0' || *rest != '\0' || pct > 100) {
			fprintf(stderr, "hog: bad same-filled percentage '%s'\n", argv[2]);
			return 2;
		}
		same_pct = (unsigned)pct;
	}

	char *end;
	unsigned long mib = strtoul(argv[1], &end, 10);
	if (*argv[1] == '\0' || *end != '\0' || mib == 0) {
		fprintf(stderr, "hog: bad size '%s'\n", argv[1]);
		return 2;
	}
	size_t pages = (size_t)mib * (1024 * 1024 / PAGE);
	uint64_t *mem = malloc(pages * PAGE);
	if (!mem) {
		fprintf(stderr, "hog: malloc(%lu MiB) failed\n", mib);
		return 2;
	}

	/* Progress every 64 MiB: under TCG a stuck swap device otherwise looks
	 * like silence until the host-side timeout fires. */
	size_t step = 64UL * 1024 * 1024 / PAGE;
	for (size_t p = 0; p < pages; p++) {
		uint64_t *w = mem + p * WORDS;
		for (size_t i = 0; i < WORDS; i++)
			w[i] = word_of(p, i);
		if ((p + 1) % step == 0) {
			printf("HOG wrote %zu MiB\n", (p + 1) * PAGE >> 20);
			fflush(stdout);
		}
	}

	size_t bad = 0;
	for (size_t p = 0; p < pages; p++) {
		const uint64_t *w = mem + p * WORDS;
		for (size_t i = 0; i < WORDS; i++) {
			if (w[i] != word_of(p, i)) {
				if (bad < 10)
					printf("HOG bad page=%zu word=%zu got=%016llx\n", p, i,
					       (unsigned long long)w[i]);
				bad++;
				break; /* count pages, not words */
			}
		}
		if ((p + 1) % step == 0) {
			printf("HOG verified %zu MiB\n", (p + 1) * PAGE >> 20);
			fflush(stdout);
		}
	}

	printf("HOG pages=%zu bad=%zu\n", pages, bad);
	if (print_vmstat() != 0)
		return 3;
	fflush(stdout);
	free(mem);
	return bad == 0 ? 0 : 1;
}
