/*
 * fio's side of the rnvme engine: struct ioengine_ops, compiled against the headers of the
 * fio that loads it (see build.rs). It reads fio's structures and calls the Rust side
 * (src/ffi.rs) with plain values; the Rust side never sees a fio structure.
 */
#include <stdlib.h>
#include <string.h>
#include <errno.h>

#include "fio.h"
#include "optgroup.h"

#define ERRLEN 512

/* src/ffi.rs */
int rnvme_fio_file_info(const char *name, int hugepages, uint64_t *size, uint32_t *lba,
			char *err, size_t errlen);
void *rnvme_fio_job_new(uint32_t depth, uint64_t max_bs, int dptr, int fua, int ring_at_commit,
			int stats, char *err, size_t errlen);
int rnvme_fio_job_report(void *job, char *buf, size_t len);
int rnvme_fio_job_add_file(void *job, uint32_t fileno, const char *name, int hugepages,
			   char *err, size_t errlen);
int rnvme_fio_job_start(void *job, char *err, size_t errlen);
void *rnvme_fio_iomem_alloc(void *job, size_t len, char *err, size_t errlen);
void rnvme_fio_iomem_free(void *job);
int rnvme_fio_queue(void *job, uint32_t fileno, int op, uint64_t offset, uint64_t len,
		    const void *buf, uint32_t index, char *err, size_t errlen);
void rnvme_fio_commit(void *job);
int rnvme_fio_getevents(void *job, uint32_t min, uint32_t max, int64_t timeout_ns);
int64_t rnvme_fio_event(void *job, uint32_t i, int *error);
int rnvme_fio_errdetails(void *job, uint32_t index, char *buf, size_t len);
void rnvme_fio_job_free(void *job);
void rnvme_fio_exit(void);
int rnvme_fio_check_version(const char *running, char *err, size_t errlen);

/* The engine options of a job file. fio's convention: the first member is a pointer. */
struct rnvme_options {
	void *pad;
	unsigned int dptr;
	unsigned int hugepages;
	unsigned int fua;
	unsigned int ring;
	unsigned int stats;
};

static struct fio_option options[] = {
	{
		.name	= "rnvme_dptr",
		.lname	= "rnvme data pointer",
		.type	= FIO_OPT_STR,
		.off1	= offsetof(struct rnvme_options, dptr),
		.help	= "How commands point at their data",
		.def	= "auto",
		.posval = {
			  { .ival = "auto", .oval = 0,
			    .help = "PRPs when two entries do, SGLs otherwise (PRPs if no SGL support)" },
			  { .ival = "prp", .oval = 1, .help = "PRP entries and lists" },
			  { .ival = "sgl", .oval = 2, .help = "Scatter-gather lists" },
		},
		.category = FIO_OPT_C_ENGINE,
		.group	= FIO_OPT_G_INVALID,
	},
	{
		.name	= "rnvme_hugepages",
		.lname	= "rnvme hugepages",
		.type	= FIO_OPT_BOOL,
		.off1	= offsetof(struct rnvme_options, hugepages),
		.help	= "DMA memory from 2 MiB hugepages (0: ordinary pages, pinned)",
		.def	= "1",
		.category = FIO_OPT_C_ENGINE,
		.group	= FIO_OPT_G_INVALID,
	},
	{
		.name	= "rnvme_fua",
		.lname	= "rnvme force unit access",
		.type	= FIO_OPT_BOOL,
		.off1	= offsetof(struct rnvme_options, fua),
		.help	= "Writes with Force Unit Access",
		.def	= "0",
		.category = FIO_OPT_C_ENGINE,
		.group	= FIO_OPT_G_INVALID,
	},
	{
		.name	= "rnvme_ring",
		.lname	= "rnvme doorbell",
		.type	= FIO_OPT_STR,
		.off1	= offsetof(struct rnvme_options, ring),
		.help	= "When queued commands are announced to the controller",
		.def	= "reap",
		.posval = {
			  { .ival = "reap", .oval = 0,
			    .help = "At fio's next reap: one doorbell for all it queued before" },
			  { .ival = "commit", .oval = 1, .help = "At each of fio's commits" },
		},
		.category = FIO_OPT_C_ENGINE,
		.group	= FIO_OPT_G_INVALID,
	},
	{
		.name	= "rnvme_stats",
		.lname	= "rnvme time accounting",
		.type	= FIO_OPT_BOOL,
		.off1	= offsetof(struct rnvme_options, stats),
		.help	= "At the job's end, say where its thread's time went: submitting, "
			  "waiting for the device, fio's own work",
		.def	= "0",
		.category = FIO_OPT_C_ENGINE,
		.group	= FIO_OPT_G_INVALID,
	},
	{ .name = NULL, },
};

struct rnvme_td;
/* fio asks for error details with the io_u alone, on the job's thread, after event(). */
static __thread struct rnvme_td *current_job;

/* What a job keeps in td->io_ops_data. */
struct rnvme_td {
	void *job;
	/* io_us by index, for event(). */
	struct io_u **by_index;
	unsigned int depth;
	/* io_us queued since the last commit, for fio's issue-time accounting. */
	struct io_u **queued;
	unsigned int nr_queued;
};

/*
 * The engine reads fio's structures as laid out by the headers it was built with: in any
 * other fio it would misread them. Refuse that at once.
 */
static int same_fio(void)
{
	char err[ERRLEN];

	if (rnvme_fio_check_version(fio_version_string, err, ERRLEN)) {
		log_err("rnvme: %s\n", err);
		return 0;
	}
	return 1;
}

static int need_threads(struct thread_data *td)
{
	if (!td->o.use_thread) {
		log_err("rnvme: %s: set thread=1 (a controller is opened once per process and "
			"its jobs run as threads of it)\n", td->o.name);
		return 0;
	}
	/* Offload would run the engine's init again in fio's submit workers, each with a
	 * queue pair of its own and none of the job's I/O buffers. */
	if (td->o.io_submit_mode == IO_MODE_OFFLOAD) {
		log_err("rnvme: %s: io_submit_mode=offload is not supported: a job submits on "
			"its own queue pair from its own thread\n", td->o.name);
		return 0;
	}
	return 1;
}

/* The largest block size of any data direction, bssplit included. */
static unsigned long long bs_largest(struct thread_data *td)
{
	unsigned long long v = 0;
	int d;
	unsigned int i;

	for (d = 0; d < DDIR_RWDIR_CNT; d++) {
		if (td->o.max_bs[d] > v)
			v = td->o.max_bs[d];
		for (i = 0; i < td->o.bssplit_nr[d]; i++)
			if (td->o.bssplit[d][i].bs > v)
				v = td->o.bssplit[d][i].bs;
	}
	return v;
}

/* A block size of the job (min, max or bssplit, any direction) that is not whole LBAs, or 0. */
static unsigned long long bs_odd(struct thread_data *td, uint32_t lba)
{
	int d;
	unsigned int i;

	for (d = 0; d < DDIR_RWDIR_CNT; d++) {
		if (td->o.min_bs[d] % lba)
			return td->o.min_bs[d];
		if (td->o.max_bs[d] % lba)
			return td->o.max_bs[d];
		for (i = 0; i < td->o.bssplit_nr[d]; i++)
			if (td->o.bssplit[d][i].bs % lba)
				return td->o.bssplit[d][i].bs;
	}
	return 0;
}

static int rnvme_setup(struct thread_data *td)
{
	struct rnvme_options *o = td->eo;
	struct fio_file *f;
	unsigned int i;
	char err[ERRLEN];

	if (!same_fio() || !need_threads(td))
		return 1;
	for_each_file(td, f, i) {
		uint64_t size;
		uint32_t lba;
		unsigned long long odd;

		if (rnvme_fio_file_info(f->file_name, o->hugepages, &size, &lba, err, ERRLEN)) {
			log_err("rnvme: %s\n", err);
			return 1;
		}
		odd = bs_odd(td, lba);
		if (odd) {
			log_err("rnvme: %s: block size %llu is not a multiple of the namespace's "
				"%u-byte LBA\n", f->file_name, odd, lba);
			return 1;
		}
		f->real_file_size = size;
		f->filetype = FIO_TYPE_BLOCK;
		fio_file_set_size_known(f);
	}
	return 0;
}

static void rnvme_cleanup(struct thread_data *td)
{
	struct rnvme_td *r = td->io_ops_data;

	if (!r)
		return;
	if (r->job) {
		char line[ERRLEN];

		/* stderr: fio's JSON output on stdout stays whole. */
		if (rnvme_fio_job_report(r->job, line, sizeof(line)))
			log_err("rnvme: %s: %s\n", td->o.name, line);
	}
	rnvme_fio_job_free(r->job);
	free(r->by_index);
	free(r->queued);
	free(r);
	td->io_ops_data = NULL;
}

static int rnvme_init(struct thread_data *td)
{
	struct rnvme_options *o = td->eo;
	struct rnvme_td *r;
	struct fio_file *f;
	unsigned int i;
	char err[ERRLEN];

	if (!same_fio() || !need_threads(td))
		return 1;
	r = calloc(1, sizeof(*r));
	if (!r)
		return 1;
	td->io_ops_data = r;
	r->depth = td->o.iodepth;
	r->by_index = calloc(r->depth, sizeof(*r->by_index));
	r->queued = calloc(r->depth, sizeof(*r->queued));
	if (!r->by_index || !r->queued)
		goto fail_quiet;
	r->job = rnvme_fio_job_new(r->depth, bs_largest(td), o->dptr, o->fua, o->ring, o->stats,
				   err, ERRLEN);
	if (!r->job)
		goto fail;
	for_each_file(td, f, i) {
		if (rnvme_fio_job_add_file(r->job, f->fileno, f->file_name, o->hugepages, err,
					   ERRLEN))
			goto fail;
	}
	if (rnvme_fio_job_start(r->job, err, ERRLEN))
		goto fail;
	return 0;
fail:
	log_err("rnvme: %s\n", err);
fail_quiet:
	rnvme_cleanup(td);
	return 1;
}

static int rnvme_iomem_alloc(struct thread_data *td, size_t total_mem)
{
	struct rnvme_td *r = td->io_ops_data;
	char err[ERRLEN];

	td->orig_buffer = rnvme_fio_iomem_alloc(r->job, total_mem, err, ERRLEN);
	if (!td->orig_buffer) {
		log_err("rnvme: I/O buffers of %zu bytes: %s\n", total_mem, err);
		return 1;
	}
	return 0;
}

static void rnvme_iomem_free(struct thread_data *td)
{
	struct rnvme_td *r = td->io_ops_data;

	if (r)
		rnvme_fio_iomem_free(r->job);
}

static int rnvme_open_file(struct thread_data *td, struct fio_file *f)
{
	return 0;
}

static int rnvme_close_file(struct thread_data *td, struct fio_file *f)
{
	return 0;
}

/* No page cache between fio and the device: nothing to invalidate. */
static int rnvme_invalidate(struct thread_data *td, struct fio_file *f)
{
	return 0;
}

static enum fio_q_status rnvme_queue(struct thread_data *td, struct io_u *io_u)
{
	struct rnvme_td *r = td->io_ops_data;
	char err[ERRLEN];
	int op, ret;

	fio_ro_check(td, io_u);
	switch (io_u->ddir) {
	case DDIR_READ:
		op = 0;
		break;
	case DDIR_WRITE:
		op = 1;
		break;
	case DDIR_TRIM:
		op = 2;
		break;
	case DDIR_SYNC:
	case DDIR_DATASYNC:
		op = 3;
		break;
	default:
		log_err("rnvme: %s is not served (read, write, trim, fsync, fdatasync are)\n",
			io_ddir_name(io_u->ddir));
		io_u->error = EINVAL;
		return FIO_Q_COMPLETED;
	}
	if (io_u->index >= r->depth) {
		io_u->error = EINVAL;
		return FIO_Q_COMPLETED;
	}
	ret = rnvme_fio_queue(r->job, io_u->file->fileno, op, io_u->offset, io_u->xfer_buflen,
			      io_u->xfer_buf, io_u->index, err, ERRLEN);
	if (ret == 1)
		return FIO_Q_BUSY;
	if (ret < 0) {
		log_err("rnvme: %s\n", err);
		io_u->error = -ret;
		return FIO_Q_COMPLETED;
	}
	r->by_index[io_u->index] = io_u;
	if (r->nr_queued < r->depth)
		r->queued[r->nr_queued++] = io_u;
	return FIO_Q_QUEUED;
}

static int rnvme_commit(struct thread_data *td)
{
	struct rnvme_td *r = td->io_ops_data;
	struct timespec now;
	unsigned int i;

	if (!r->nr_queued)
		return 0;
	rnvme_fio_commit(r->job);
	/* One clock reading for the batch, as fio's io_uring and libaio engines do. */
	if (fio_fill_issue_time(td)) {
		fio_gettime(&now, NULL);
		for (i = 0; i < r->nr_queued; i++) {
			memcpy(&r->queued[i]->issue_time, &now, sizeof(now));
			io_u_queued(td, r->queued[i]);
		}
		if (td->o.read_iolog_file)
			memcpy(&td->last_issue, &now, sizeof(now));
	}
	r->nr_queued = 0;
	return 0;
}

static int rnvme_getevents(struct thread_data *td, unsigned int min, unsigned int max,
			   const struct timespec *t)
{
	struct rnvme_td *r = td->io_ops_data;
	int64_t ns = t ? (int64_t)t->tv_sec * 1000000000LL + t->tv_nsec : -1;

	return rnvme_fio_getevents(r->job, min, max, ns);
}

static struct io_u *rnvme_event(struct thread_data *td, int ev)
{
	struct rnvme_td *r = td->io_ops_data;
	int error = 0;
	int64_t index = rnvme_fio_event(r->job, ev, &error);
	struct io_u *io_u;

	if (index < 0 || index >= r->depth)
		return NULL;
	io_u = r->by_index[index];
	io_u->error = error;
	current_job = r;
	return io_u;
}

static char *rnvme_errdetails(struct io_u *io_u)
{
	char buf[ERRLEN];

	if (!current_job || io_u->index >= current_job->depth ||
	    rnvme_fio_errdetails(current_job->job, io_u->index, buf, ERRLEN))
		return strdup("rnvme: no details");
	return strdup(buf);
}

static struct ioengine_ops ioengine = {
	.name			= "rnvme",
	.version		= FIO_IOOPS_VERSION,
	/* Diskless: the names are controllers, not paths (fio would otherwise make a
	 * directory for the part of "0000.04.00.0/1" before the slash). */
	.flags			= FIO_RAWIO | FIO_NOEXTEND | FIO_NODISKUTIL | FIO_MEMALIGN |
				  FIO_DISKLESSIO | FIO_ASYNCIO_SETS_ISSUE_TIME,
	.setup			= rnvme_setup,
	.init			= rnvme_init,
	.queue			= rnvme_queue,
	.commit			= rnvme_commit,
	.getevents		= rnvme_getevents,
	.event			= rnvme_event,
	.errdetails		= rnvme_errdetails,
	.cleanup		= rnvme_cleanup,
	.open_file		= rnvme_open_file,
	.close_file		= rnvme_close_file,
	.invalidate		= rnvme_invalidate,
	.iomem_alloc		= rnvme_iomem_alloc,
	.iomem_free		= rnvme_iomem_free,
	.option_struct_size	= sizeof(struct rnvme_options),
	.options		= options,
};

/* fio unloads the engine after its jobs: the controllers are shut down then. */
static void __attribute__((destructor)) rnvme_unload(void)
{
	rnvme_fio_exit();
}

/* The ops, for get_ioengine (src/ffi.rs): the symbol fio looks up in an external engine. */
struct ioengine_ops *rnvme_fio_ops(void)
{
	return &ioengine;
}
